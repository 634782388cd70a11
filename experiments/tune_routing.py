"""GPU times of the fused routing kernels (moe_pallas/kernels/fused_routing.py) per tuning variant.

  PYTHONPATH=. python3 experiments/tune_routing.py --out=$OUT/tune_routing.jsonl

For each T (the benchmark's uniform draws) it times XLA's route -> plan_local -> make_tile_schedule and
`route_and_schedule` with each (tokens_per_block, num_warps, tiles_per_step, layout_in_place) variant, per
kernel and as the call's span (GpuTimer: L2 flushed before every call, median), and checks that every
variant's schedule equals XLA's (the routing weights to 1e-6 relative: their sum's order differs).
"""

from __future__ import annotations

import json
import statistics
import sys

from absl import app, flags

_WORKLOADS = flags.DEFINE_string("workloads", "1,16,80,901", "Workloads (benchmark.py --workloads syntax).")
_VARIANTS = flags.DEFINE_list("variants", ["2/4/256", "2/4/256/in_place", "4/4/256", "4/4/256/in_place",
                                           "16/4/1024", "1/1/256", "8/2/256"],
                              "tokens_per_block/num_warps/tiles_per_step[/in_place][/rN] variants "
                              "(in_place: `layout_in_place=True`, layout folded into place; rN: the route "
                              "kernel on N warps, the others on num_warps).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per variant.")
_OUT = flags.DEFINE_string("out", "tune_routing.jsonl", "JSONL output.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  import moe_pallas as mp
  from experiments import workloads as wl
  from experiments.timing import GpuTimer
  from moe_pallas.kernels import fused_routing
  from moe_pallas.kernels.schedule import make_tile_schedule

  config = mp.DEEPSEEK_V3
  num_local, block_m = config.num_local_experts, 16
  timer = GpuTimer()

  def xla(logits, bias, offset):
    ids, w = mp.route(logits, bias, config=config, routed_scaling_factor=2.5)
    plan = mp.plan_local(ids, w, local_expert_offset=offset, num_local_experts=num_local)
    return make_tile_schedule(plan, block_m=block_m)

  def fused(variant):
    tokens_per_block, num_warps, tiles_per_step, *options = variant.split("/")
    route_warps = [int(o[1:]) for o in options if o[:1] == "r" and o[1:].isdigit()]
    if set(options) - {"in_place"} - {f"r{w}" for w in route_warps} or len(route_warps) > 1:
      raise ValueError(f"unknown options in variant {variant!r}: {options}")

    def run(logits, bias, offset):
      return fused_routing.route_and_schedule(logits, bias, jnp.float32(2.5), offset, config=config,
                                              num_local_experts=num_local, block_m=block_m,
                                              tokens_per_block=int(tokens_per_block), num_warps=int(num_warps),
                                              route_warps=route_warps[0] if route_warps else int(num_warps),
                                              tiles_per_step=int(tiles_per_step),
                                              layout_in_place="in_place" in options)[0]
    return run

  out = open(_OUT.value, "w")
  lines = []
  for workload in wl.select(_WORKLOADS.value, config):
    d = wl.draw(config, workload, "uniform")
    args = (d.routing_logits, d.routing_bias, jnp.int32(workload.local_expert_offset))
    want = jax.jit(xla)(*args)
    variants = [("xla", xla)] + [(v, fused(v)) for v in _VARIANTS.value]
    for name, fn in variants:
      try:
        jitted = jax.jit(fn)
        got = jitted(*args)
        # Integer maps exactly; the weights up to the last bits (the fused kernel sums the top_k picks in
        # another order than XLA's reduction).
        same = all(bool(np.array_equal(np.asarray(getattr(got, f)), np.asarray(getattr(want, f))))
                   for f in want._fields if f != "row_weight")
        same = same and bool(np.allclose(np.asarray(got.row_weight), np.asarray(want.row_weight), rtol=1e-6, atol=0))
        times = timer.time_calls(jitted, args, iters=_ITERS.value, warmup=2)
      except Exception as err:  # one failing variant must not hide the others
        print(f"T={workload.num_tokens} {name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        continue
      total = sum(us for _, us in times.kernels)
      row = dict(T=workload.num_tokens, variant=name, total_us=round(total, 2),
                 span_us=round(statistics.median(times.span_us), 2), num_kernels=times.num_kernels,
                 kernels=[(k, round(us, 2)) for k, us in times.kernels], same_schedule=same,
                 device=jax.devices()[0].device_kind)
      out.write(json.dumps(row) + "\n")
      out.flush()
      detail = " ".join(f"{k.replace('moe_', '')} {us:.1f}" for k, us in times.kernels if k.startswith("moe_"))
      lines.append(f"T={workload.num_tokens:>5} {name:<16} sum {total:7.1f} us span {row['span_us']:7.1f} in "
                   f"{times.num_kernels:>2} kernels "
                   f"{'same' if same else 'DIFFERENT'}  {detail}")
      print(lines[-1], flush=True)
  print("\n".join(lines))


if __name__ == "__main__":
  sys.exit(app.run(main))
