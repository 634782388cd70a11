r"""Routing as one program or two kernels at small T, timed as the benchmark's pipelined rows are.

At T=1 and 7 the pipelined figure can time the host (`pipelined_host_bound_rounds`, PERF 59-60): the host
pays ~5-10 us a launch, and the layer at T=7 is 5 launches, 2 of them routing (route, layout_place). One
program for route + layout + place (`fused_routing.ONE_PROGRAM_MAX_TOKENS`: T tokens in one block) is one
launch fewer for ~1 us more GPU time (PERF 55). This probe times both on the same machine, alternating,
with the benchmark's method (`timing.time_pipelined`: flush + call enqueued back to back, median of
rounds), records the host's enqueue time per call and the kernels' GPU times (`GpuTimer`), and checks that
both forms give the same output bits. Measured on the H200 (PERF 66): one program is slower at T=7.

  PYTHONPATH=. python3 experiments/one_program_routing_probe.py --probe_tokens=1,7 --probe_jsonl=$OUT/one_program.jsonl
"""

from __future__ import annotations

import json
import os
import statistics

from absl import app
from absl import flags

_TOKENS = flags.DEFINE_list("probe_tokens", ["7"], "Token counts T (benchmark.py workloads).")
_BOUNDS = flags.DEFINE_list("bounds", ["2", "8"], "Values of fused_routing.ONE_PROGRAM_MAX_TOKENS to compare.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Times each bound is measured, alternating with the others.")
_ROUNDS = flags.DEFINE_integer("probe_rounds", 15, "Pipelined rounds per measurement.")
_ITERS = flags.DEFINE_integer("probe_iters", 40, "Calls per pipelined round.")
_LAYOUT = flags.DEFINE_enum("probe_weights_layout", "block_major", ["spec", "block_major"], "Expert weights' order.")
_JSONL = flags.DEFINE_string("probe_jsonl", "", "JSONL output (optional).")


def main(argv):
  del argv
  os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")  # as benchmark.py by default
  import jax
  import jax.numpy as jnp
  import numpy as np

  import moe_pallas as mp
  from experiments import benchmark, timing
  from moe_pallas import testing, weight_layout
  from moe_pallas.kernels import fused_routing

  config = mp.DEEPSEEK_V3
  device = jax.devices()[0]
  weights = jax.block_until_ready(weight_layout.experts_in_layout(testing.random_weights(config, seed=0),
                                                                  _LAYOUT.value))
  timer = timing.GpuTimer(device=device)
  bounds = [int(b) for b in _BOUNDS.value]
  rows = []
  for t in _TOKENS.value:
    workload, args = benchmark.jitted_layer_args(config, t, weights, device)
    outputs = {}
    for repeat in range(_REPEATS.value):
      for bound in bounds:
        fused_routing.ONE_PROGRAM_MAX_TOKENS = bound  # read at trace time: clear the caches of jitted callees
        jax.clear_caches()
        layer = benchmark.jitted_layer("triton", config, False, jnp.dtype(jnp.float8_e4m3fn))
        out = np.asarray(jax.block_until_ready(layer(*args)).astype(jnp.float32))
        outputs.setdefault(bound, out)
        same_bits = bool(np.array_equal(out, outputs[bounds[0]]))
        res = timing.time_pipelined(layer, args, iters=_ITERS.value, rounds=_ROUNDS.value, device=device)
        times = timer.time_calls(layer, args, iters=15, warmup=2)
        row = dict(device=device.device_kind, T=workload.num_tokens, bound=bound, repeat=repeat,
                   same_bits_as_first_bound=same_bits, num_kernels=times.num_kernels,
                   kernel_sum_us=statistics.median(times.kernel_sum_us), kernels=times.kernels,
                   host_us_per_call=res["pipelined_enqueue_us"] - res["pipelined_flush_enqueue_us"],
                   **{k: v for k, v in res.items() if k != "pipelined_method"})
        rows.append(row)
        print(f"T={row['T']:>3} bound={bound} rep={repeat} kernels={row['num_kernels']} "
              f"kernel_sum={row['kernel_sum_us']:6.1f} pipelined={row['pipelined_us']:6.1f} "
              f"(min {row['pipelined_min_us']:6.1f}) host/call={row['host_us_per_call']:6.1f} "
              f"host_bound_rounds={row['pipelined_host_bound_rounds']} same_bits={same_bits}", flush=True)
  if _JSONL.value:
    with open(_JSONL.value, "w") as f:
      for row in rows:
        f.write(json.dumps(row, default=str) + "\n")
  print("median pipelined us per (T, bound):")
  for t in sorted({r["T"] for r in rows}):
    for bound in bounds:
      sel = [r for r in rows if r["T"] == t and r["bound"] == bound]
      print(f"  T={t:>3} bound={bound}: pipelined {statistics.median(r['pipelined_us'] for r in sel):6.1f}, "
            f"kernel sum {statistics.median(r['kernel_sum_us'] for r in sel):6.1f}, host/call "
            f"{statistics.median(r['host_us_per_call'] for r in sel):6.1f}, kernels {sel[0]['num_kernels']}")
  if not all(r["same_bits_as_first_bound"] for r in rows):
    raise SystemExit("the bounds gave different outputs")


if __name__ == "__main__":
  app.run(main)
