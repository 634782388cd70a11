"""GPU check that an expert no token picked costs no weight reads: same T, same local pairs, 1 vs 8 experts.

  PYTHONPATH=. python3 experiments/experts_touched_check.py

T = 8 tokens, each with exactly one pick on this rank (its other 7 picks elsewhere). In the first draw all
8 tokens pick local expert 0 (1 expert touched); in the second token t picks local expert 4t (8 experts
touched). The grouped GEMMs stream only the touched experts' weights, so their GPU time should grow about
8x (44 MB of FP8 weights per expert), not stay at the cost of all 32 experts.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

import moe_pallas as mp
from moe_pallas import testing

from experiments.timing import GpuTimer  # the benchmark harness's GPU-span timer

CONFIG = mp.DEEPSEEK_V3
OFFSET = 32  # local experts 32..63: routing group 1


def _logits(local_picks: list[int], seed: int) -> jax.Array:
  """Each token's one local pick wins its group; every other local expert loses to the other groups."""
  num_tokens = len(local_picks)
  others = jax.random.normal(jax.random.key(seed), (num_tokens, CONFIG.num_experts)) - 3.0
  local = jnp.full((num_tokens, CONFIG.num_local_experts), -10.0)
  local = local.at[jnp.arange(num_tokens), jnp.asarray(local_picks)].set(10.0)
  return others.at[:, OFFSET:OFFSET + CONFIG.num_local_experts].set(local)


def main():
  weights = testing.random_weights(CONFIG, seed=0)
  _, bias, hidden, hidden_scale = testing.random_activations(CONFIG, 8, seed=1, local_expert_offset=OFFSET)
  timer = GpuTimer()
  layer = jax.jit(lambda *x: mp.moe_layer(*x, local_expert_offset=OFFSET, routed_scaling_factor=2.5,
                                          implementation="triton"))
  print(f"device: {jax.devices()[0].device_kind}; T=8, offset {OFFSET}; times: GPU, L2 flushed, median of 20")
  for label, picks in (("1 expert touched", [0] * 8), ("8 experts touched", [4 * t for t in range(8)])):
    logits = _logits(picks, seed=2)
    ids, _ = mp.route(logits, bias, config=CONFIG, routed_scaling_factor=2.5)
    local = np.asarray(ids) - OFFSET
    local = local[(local >= 0) & (local < CONFIG.num_local_experts)]
    assert sorted(local.tolist()) == sorted(picks), (local, picks)
    args = (logits, bias, hidden, hidden_scale, *weights)
    times = timer.time_calls(layer, args, iters=20, warmup=3)
    gemms = {name: us for name, us in times.kernels if name.startswith("moe_gemm")}
    print(f"{label}: local pairs {len(local)}, experts {len(set(local.tolist()))}; "
          + ", ".join(f"{name} {us:.1f} us" for name, us in gemms.items())
          + f"; GEMMs {sum(gemms.values()):.1f} us; layer span {statistics.median(times.span_us):.1f} us")


if __name__ == "__main__":
  main()
