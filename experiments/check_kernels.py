"""Kernel bring-up on the GPU: correctness at full shape and per-kernel GPU times of tile variants.

  PYTHONPATH=. python3 experiments/check_kernels.py --tilings --T=1,16,80,901,14107 --all_local_T=901

For each T (uniform routing, plus all_local rows) it checks implementation="triton" against the xla path
(float32, on device) under SPEC.md's criterion (inputs from moe_pallas.testing), and prints GPU spans (experiments/timing.py: L2 flushed
before every call, median) of the xla path, the default tiling and, with --tilings, a few tile variants,
with the per-kernel times of each. Its seeds are its own, not experiments/workloads.py's: use
experiments/benchmark.py for reportable numbers. Which MMA the GEMMs use is
read with ncu through experiments/tensor_core_check.py.
"""

from __future__ import annotations

import statistics
import sys

from absl import app, flags

_T = flags.DEFINE_list("T", ["1", "7", "16", "32", "80", "901", "14107"], "Token counts (uniform routing).")
_ALL_LOCAL = flags.DEFINE_list("all_local_T", ["901", "14107"], "Token counts with all_local routing.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per row.")
_TILINGS = flags.DEFINE_bool("tilings", False, "Also time a few tile variants at each T.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  import moe_pallas as mp
  from moe_pallas import testing
  from moe_pallas.kernels import grouped_moe, tiling as tiling_lib

  config = mp.DEEPSEEK_V3
  device = jax.devices()[0]
  print(f"device: {device.device_kind}, jax {jax.__version__}", flush=True)
  L = config.num_local_experts

  weights = testing.random_weights(config, seed=0)

  def activations(T, seed, offset, all_local):
    return testing.random_activations(config, T, seed=seed, local_expert_offset=offset,
                                      scenario="all_local" if all_local else "uniform")

  from experiments.timing import GpuTimer  # the benchmark harness's GPU-span timer
  timer = GpuTimer()
  breakdowns = {}

  def time_fn(fn, args, label=None):
    out = fn(*args).block_until_ready()
    times = timer.time_calls(fn, args, iters=_ITERS.value, warmup=2)
    if label:
      breakdowns[label] = times.kernels
    return out, statistics.median(times.span_us)

  def layer(implementation, tiling=None):
    def run(logits, bias, hs, hss, w1, w1s, w2, w2s, offset):
      ids, w = mp.route(logits, bias, config=config, routed_scaling_factor=2.5)
      plan = mp.plan_local(ids, w, local_expert_offset=offset, num_local_experts=L)
      if implementation == "xla":
        out = mp.apply_local_experts(hs, hss, w1, w1s, w2, w2s, plan, implementation="xla")
      else:
        out = grouped_moe.apply_local_experts_triton(hs, hss, w1, w1s, w2, w2s, plan, tiling=tiling,
                                                     out_dtype=jnp.bfloat16)
      return out.astype(jnp.bfloat16)
    return jax.jit(run)

  variants = {"triton": None}
  if _TILINGS.value:
    G = tiling_lib.GemmTiling
    variants.update({
        "g1w4s4": tiling_lib.MoETiling(G(64, 128, group_m=8, num_stages=4), G(64, 64, group_m=8, num_stages=4)),
        "g1w8s3": tiling_lib.MoETiling(G(64, 128, group_m=8, num_warps=8, num_stages=3),
                                       G(64, 64, group_m=8, num_stages=3)),
        "g1w8s5": tiling_lib.MoETiling(G(64, 128, group_m=8, num_warps=8, num_stages=5),
                                       G(64, 64, group_m=8, num_stages=5)),
        "g1n64w8": tiling_lib.MoETiling(G(64, 64, group_m=8, num_warps=8, num_stages=4),
                                        G(64, 64, 64, group_m=8, num_stages=4)),
    })
  xla_fn = layer("xla")
  fns = {name: layer("triton", t) for name, t in variants.items()}
  rows = [(int(t), False) for t in _T.value] + [(int(t), True) for t in _ALL_LOCAL.value]
  table = []
  table.append(f"{'T':>6} {'routing':>9} {'pairs':>6} {'experts':>7} {'xla_us':>9} " +
        " ".join(f"{n + '_us':>14}" for n in fns) + "  matched  rel_l2")
  for T, all_local in rows:
    offset = 96 if T not in (1, 14107) else 32
    acts = activations(T, 1000 + T, offset, all_local)
    args = (*acts, *weights, jnp.int32(offset))
    ids, _ = mp.route(acts[0], acts[1], config=config, routed_scaling_factor=2.5)
    local = (np.asarray(ids) >= offset) & (np.asarray(ids) < offset + L)
    pairs, touched = int(local.sum()), len(np.unique(np.asarray(ids)[local]))
    ref, xla_us = time_fn(xla_fn, args)
    results = {}
    for name, fn in fns.items():
      try:
        out, us = time_fn(fn, args, label=f"{name} T={T} {'all_local' if all_local else 'uniform'}")
        results[name] = (out, us)
      except Exception as err:  # report and go on: one bad tile variant must not hide the others
        print(f"  {name} failed at T={T}: {type(err).__name__}: {str(err)[:400]}", flush=True)
    out = results.get("triton", (None,))[0]
    if out is not None:
      metrics = testing.acceptance_metrics(out, ref)
      matched, rel, finite = metrics["matched_ratio"], metrics["rel_l2"], metrics["finite"]
    else:
      matched, rel, finite = float("nan"), float("nan"), False
    times = " ".join(f"{results[n][1]:14.1f}" if n in results else f"{'fail':>14}" for n in fns)
    table.append(f"{T:>6} {'all_local' if all_local else 'uniform':>9} {pairs:>6} {touched:>7} {xla_us:9.1f} "
                 f"{times}  {matched:.4f}  {rel:.2e}{'' if finite else '  NON-FINITE'}")
    print(table[-1], flush=True)

  print("moe kernels (GPU us) per variant; 'other' = all non-moe kernels summed:")
  for label, kernels in breakdowns.items():
    moe = [f"{n.replace('moe_', '')} {us:.1f}" for n, us in kernels if n.startswith("moe_")]
    other = sum(us for n, us in kernels if not n.startswith("moe_"))
    print(f"  {label}: {', '.join(moe)}, other {other:.1f} in {len(kernels) - len(moe)} kernels")
  print("span us (GPU, L2 flushed, median):")
  print("\n".join(table))


if __name__ == "__main__":
  sys.exit(app.run(main))
