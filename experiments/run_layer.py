r"""The main job: one call of `moe_pallas.moe_layer` on the default device, checked and timed.

Inputs are built as the benchmark builds them (experiments/workloads.py): synthetic routing drawn with a
seed fixed by (T, offset, scenario) -- `uniform` takes the first seed with at least one local pair --, FP8
values clip(N(0, 1), -2, 2), scales N(0, 1), routed_scaling_factor 2.5. The output is checked against the
float64 NumPy oracle (moe_pallas/testing/oracle.py) on every token up to --oracle_max_tokens and on a random sample of
--oracle_subset_tokens tokens above that (the layer is row-independent, so a token subset is an exact
sub-problem); a kernel implementation is also compared with the xla path on every token. It prints the
routing statistics, SPEC.md's matched ratio, the relative L2 error and the median host wall time of --iters
calls (experiments/timing.py's host timer: block_until_ready after each call; experiments/benchmark.py does the
public benchmark's GPU timing).

Defaults follow the device: on a GPU the DeepSeek-V3 shape at the public workload T=901 (offset 96); on a
CPU the small shape (H=256, I=128, E=32, 8 local) at T=57, which ends well under two minutes on 2 cores.

  python -m experiments.run_layer                                  # the device's defaults
  python -m experiments.run_layer --T=1 --implementation=xla       # DeepSeek-V3, T=1 at offset 32 (GPU)
  python -m experiments.run_layer --shape=deepseek_v3 --T=7        # the full shape on a CPU (~1-2 min)
  python -m experiments.run_layer --implementation=triton --interpret --T=16   # the kernels on a CPU

Exits with status 1 when the output fails SPEC.md's acceptance criterion or the rel-L2 bound.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app
from absl import flags

from experiments import reference as reference_lib

_T = flags.DEFINE_integer("T", None, "Tokens (default: 901 on a GPU, 57 on a CPU).", lower_bound=1)
_OFFSET = flags.DEFINE_integer("offset", None, "local_expert_offset in the chosen shape's geometry (default: the "
                               "public workload's offset for this T, mapped onto the shape's ranks; else 0).")
_SCENARIO = flags.DEFINE_enum("scenario", "uniform", ["uniform", "skewed", "all_local", "no_local"],
                              "Synthetic routing scenario (SPEC.md).")
_SHAPE = flags.DEFINE_enum("shape", None, ["deepseek_v3", "small"],
                           "Layer geometry (default: deepseek_v3 on a GPU, small on a CPU).")
_IMPLEMENTATION = flags.DEFINE_enum("implementation", "auto", ["auto", "xla", "triton"],
                                    "moe_layer implementation; auto = the best available on this device.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run the Pallas kernels in interpret mode (CPU).")
_INTERMEDIATE = flags.DEFINE_enum("intermediate_dtype", "float8_e4m3fn", ["float8_e4m3fn", "bfloat16"],
                                  "SwiGLU output precision before GEMM2 on the kernel path.")
_ITERS = flags.DEFINE_integer("iters", None, "Timed calls, median reported (default: 20 on a GPU, 3 on a CPU).",
                              lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after the first (compiling) one.", lower_bound=0)
_WEIGHT_SEED = flags.DEFINE_integer("weight_seed", 0, "Seed of the weight set (the benchmark's default is 0).")
_ORACLE_MAX_TOKENS = flags.DEFINE_integer("oracle_max_tokens", 64, "Check every token against the oracle up to "
                                          "this T; above it, a sample of --oracle_subset_tokens tokens.")
_ORACLE_SUBSET = flags.DEFINE_integer("oracle_subset_tokens", 64, "Tokens the oracle checks above "
                                      "--oracle_max_tokens.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Append the result as one JSON line to this file.")

ROUTED_SCALING_FACTOR = 2.5
# SPEC.md's project standard against the float64 oracle: float32/bf16 SwiGLU output (the xla path, or the
# kernels with --intermediate_dtype=bfloat16) vs. re-quantized to FP8 before GEMM2 (the kernels' default).
REL_L2_BOUND = {"float32": 1e-2, "bfloat16": 1e-2, "float8_e4m3fn": 3.5e-2}


def _resolve_implementation(layer, name: str, interpret: bool) -> tuple[str, str]:
  """(implementation to run, note): "auto" is moe_layer's best available on this device."""
  return layer.resolve_implementation(None if name == "auto" else name, interpret=interpret), ""


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from experiments import timing, workloads
  from moe_pallas import MoEConfig, layer, moe_layer, testing

  on_gpu = jax.default_backend() == "gpu"
  shape = _SHAPE.value or ("deepseek_v3" if on_gpu else "small")
  config = MoEConfig.deepseek_v3() if shape == "deepseek_v3" else MoEConfig.small()
  num_tokens = _T.value or (901 if on_gpu else 57)
  iters = _ITERS.value or (20 if on_gpu else 3)
  if _OFFSET.value is None:
    offset = workloads.select(str(num_tokens), config)[0].local_expert_offset
  else:
    offset = _OFFSET.value
  implementation, note = _resolve_implementation(layer, _IMPLEMENTATION.value, _INTERPRET.value)
  intermediate = "float32" if implementation == "xla" else _INTERMEDIATE.value
  device = jax.devices()[0]
  print(f"device: {device.platform} {device.device_kind} (jax {jax.__version__})")
  print(f"layer: shape={shape} (H={config.hidden} I={config.intermediate} E={config.num_experts} "
        f"E_local={config.num_local_experts} top_k={config.top_k}) T={num_tokens} offset={offset} "
        f"scenario={_SCENARIO.value} implementation={implementation}{note} "
        f"interpret={_INTERPRET.value} swiglu_out={intermediate}")

  t0 = time.perf_counter()
  weights = jax.block_until_ready(testing.random_weights(config, seed=_WEIGHT_SEED.value))
  workload = workloads.Workload(num_tokens, offset, "custom", ROUTED_SCALING_FACTOR)
  draw = workloads.draw(config, workload, _SCENARIO.value)
  inputs = (*draw.activations(0), *weights)
  routing = draw.describe()
  print(f"inputs: drawn in {time.perf_counter() - t0:.1f} s; synthetic {_SCENARIO.value} routing, seed "
        f"{routing['seed']} ({routing['seeds_tried']} tried): {routing['pairs']} local pairs on "
        f"{routing['experts_touched']} experts (max {routing['max_pairs_per_expert']} per expert)")

  def call(implementation=implementation):
    return moe_layer(*inputs, local_expert_offset=offset, routed_scaling_factor=ROUTED_SCALING_FACTOR,
                     config=config, implementation=implementation, interpret=_INTERPRET.value,
                     intermediate_dtype=jnp.dtype(_INTERMEDIATE.value))

  t0 = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - t0
  times = [us * 1e-6 for us in timing.HostTimer(device=device).time_calls(call, (), iters=iters,
                                                                          warmup=_WARMUP.value).span_us]
  out = np.asarray(call()).astype(np.float32)
  median_ms = 1e3 * statistics.median(times)
  print(f"time: {median_ms:.3f} ms median of {iters} (min {1e3 * min(times):.3f} ms; host wall clock); "
        f"first call incl. compile {first:.2f} s")

  # The oracle on every token, or on a sample of rows (each row depends only on its own token's inputs).
  rows = None
  if num_tokens > _ORACLE_MAX_TOKENS.value:
    rows = reference_lib.sample_rows(num_tokens, _ORACLE_SUBSET.value, seed=routing["seed"])
  t0 = time.perf_counter()
  ref = reference_lib.oracle(draw.activations(0), weights, config=config, local_expert_offset=offset,
                             routed_scaling_factor=ROUTED_SCALING_FACTOR, rows=rows)
  rows = np.arange(num_tokens) if rows is None else rows
  checked = f"{len(rows)} of {num_tokens} tokens" if len(rows) < num_tokens else f"all {num_tokens} tokens"
  metrics = testing.acceptance_metrics(out[rows], ref)
  bound = REL_L2_BOUND[intermediate]
  passed = metrics["passed"] and metrics["rel_l2"] <= bound
  print(f"check vs float64 oracle ({checked}, {time.perf_counter() - t0:.1f} s): "
        f"matched {metrics['matched_ratio']:.4f}, rel_l2 {metrics['rel_l2']:.3e} (bound {bound:g}), "
        f"finite {metrics['finite']}: {'PASS' if passed else 'FAIL'}")
  result = dict(shape=shape, T=num_tokens, offset=offset, scenario=_SCENARIO.value, implementation=implementation,
                interpret=_INTERPRET.value, swiglu_out=intermediate, device=device.device_kind, **routing,
                median_ms=median_ms, min_ms=1e3 * min(times), iters=iters, first_call_s=first,
                oracle_tokens=len(rows), matched_ratio=metrics["matched_ratio"], rel_l2=metrics["rel_l2"],
                passed=passed)
  if implementation != "xla":
    xla = np.asarray(call("xla")).astype(np.float32)
    vs_xla = testing.acceptance_metrics(out, xla)
    print(f"check vs xla path (all {num_tokens} tokens): matched {vs_xla['matched_ratio']:.4f}, "
          f"rel_l2 {vs_xla['rel_l2']:.3e}")
    result.update(vs_xla_matched_ratio=vs_xla["matched_ratio"], vs_xla_rel_l2=vs_xla["rel_l2"])
  print(f"RESULT {shape} T={num_tokens}@{offset} {_SCENARIO.value} {implementation}: {median_ms:.3f} ms | "
        f"matched {metrics['matched_ratio']:.4f} | rel_l2 {metrics['rel_l2']:.2e} | {'PASS' if passed else 'FAIL'}")
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      f.write(json.dumps(result) + "\n")
  return 0 if passed else 1


if __name__ == "__main__":
  app.run(main)
