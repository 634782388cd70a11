"""Does XLA (jax 0.11.2) launch a Pallas-Triton kernel as a programmatic dependent launch (PDL)?

At T=14-80 our layer runs 6 kernels back to back and the pipelined figure carries 2-8 us over their sum
(launch gaps and each kernel's ramp), which the peer's GEMM-path sum does not count. With PDL, a kernel's
programs start while its predecessor drains and block at `griddepcontrol.wait` until the predecessor has
finished and its writes are visible. XLA decides per kernel whether to launch it so; this probe finds out
whether it does so for Pallas-Triton kernels that contain the instruction, by timestamps:

  `spin` (one program per SM) reads %globaltimer until `--spin_us` have passed and writes its end time;
  `follow` (same grid) writes its start time, then (variant) waits on the grid dependency, writes that
  time, and reads spin's output (the data dependence that orders the two in XLA's program).

If XLA launched `follow` with PDL, its earliest start precedes spin's latest end. Variants: the wait in
`follow` or not; `launch_dependents` at the start of `spin` or not; a chain of 3 pairs (6 kernels, the
command buffer's minimum) or one pair; each with XLA's default flags and with `--xla_gpu_enable_pdl=true`
(`--xla_pdl`), in a process of its own. The same numbers give the gap between two kernels without PDL
(measured on the H200: 576-768 ns; experiments/PERF.md 38).

    PYTHONPATH=. python3 experiments/pdl_probe.py --out=pdl.jsonl
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

from experiments import tables

_SPIN_US = flags.DEFINE_float("spin_us", 20.0, "How long each spin program runs.")
_OUT = flags.DEFINE_string("out", "", "JSONL output (optional).")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one variant in this process ('wait,trigger,pairs').")
_XLA_PDL = flags.DEFINE_list("xla_pdl", ["default", "true"], "Values of --xla_gpu_enable_pdl to try.")


def _primitives():
  """%globaltimer, griddepcontrol.wait and griddepcontrol.launch_dependents as non-pure inline asm."""
  import jax
  import jax.numpy as jnp
  from jax.extend import core as jex_core
  from jax.interpreters import mlir
  from jax._src.lib.mlir import ir
  from jax._src.lib.triton import dialect as tt
  from jax._src.pallas.triton import lowering as triton_lowering

  def define(name, asm, constraints, dtype, ir_type):
    primitive = jex_core.Primitive(name)
    primitive.def_impl(lambda: jnp.zeros((), dtype))
    primitive.def_abstract_eval(lambda: jax.core.ShapedArray((), dtype))
    mlir.register_lowering(primitive, mlir.lower_fun(lambda: jnp.zeros((), dtype), multiple_results=False))
    triton_lowering.triton_lowering_rules[primitive] = lambda ctx: tt.elementwise_inline_asm(
        [ir_type()], asm, constraints=constraints, pure=False, packed_element=1, args=[])
    return primitive.bind

  timer = define("probe_globaltimer", "mov.u64 $0, %globaltimer;", "=l", jnp.int64,
                 lambda: ir.IntegerType.get_signless(64))
  wait = define("probe_gdc_wait", "griddepcontrol.wait; // $0", "=r", jnp.int32,
                lambda: ir.IntegerType.get_signless(32))
  trigger = define("probe_gdc_launch", "griddepcontrol.launch_dependents; // $0", "=r", jnp.int32,
                   lambda: ir.IntegerType.get_signless(32))
  return timer, wait, trigger


def _run_variant(wait_in_follow: bool, trigger_in_spin: bool, pairs: int, spin_ns: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton

  jax.config.update("jax_enable_x64", True)
  timer, wait, trigger = _primitives()
  grid = jax.devices()[0].core_count if hasattr(jax.devices()[0], "core_count") else 132

  def spin_kernel(x_ref, o_ref):
    t0 = timer()
    if trigger_in_spin:
      trigger()
    end = jax.lax.while_loop(lambda t: t - t0 < spin_ns, lambda t: timer(), t0)
    o_ref[...] = jnp.full((1, 8), end, jnp.int64) + x_ref[...] * 0

  def follow_kernel(a_ref, o_ref):
    start = timer()
    if wait_in_follow:
      wait()
    after = timer()
    a = a_ref[...]
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, 8), 1)
    o_ref[...] = jnp.where(lane == 0, start, jnp.where(lane == 1, after, a))

  spec = pl.BlockSpec((1, 8), lambda i: (i, 0))
  params = pltriton.CompilerParams(num_warps=1, num_stages=1)
  spin = pl.pallas_call(spin_kernel, grid=(grid,), in_specs=[spec], out_specs=spec,
                        out_shape=jax.ShapeDtypeStruct((grid, 8), jnp.int64), compiler_params=params)
  follow = pl.pallas_call(follow_kernel, grid=(grid,), in_specs=[spec], out_specs=spec,
                          out_shape=jax.ShapeDtypeStruct((grid, 8), jnp.int64), compiler_params=params)

  @jax.jit
  def chain(x):
    outs = []
    for _ in range(pairs):
      a = spin(x)
      b = follow(a)
      outs.append((a, b))
      x = b
    return outs

  x = jnp.zeros((grid, 8), jnp.int64)
  jax.block_until_ready(chain(x))
  overlaps = []
  for _ in range(5):
    outs = jax.device_get(chain(x))
    for a, b in outs:
      a_end = int(np.max(a[:, 0]))
      overlaps.append({"follow_start_minus_spin_end_ns": int(np.min(b[:, 0])) - a_end,
                       "follow_after_wait_minus_spin_end_ns": int(np.min(b[:, 1])) - a_end})
  starts = sorted(o["follow_start_minus_spin_end_ns"] for o in overlaps)
  afters = sorted(o["follow_after_wait_minus_spin_end_ns"] for o in overlaps)
  return {"wait_in_follow": wait_in_follow, "trigger_in_spin": trigger_in_spin, "pairs": pairs,
          "grid": grid, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "start_minus_end_ns_min_median_max": [starts[0], starts[len(starts) // 2], starts[-1]],
          "after_wait_minus_end_ns_min_median_max": [afters[0], afters[len(afters) // 2], afters[-1]],
          "pdl": starts[len(starts) // 2] < 0}


def main(argv):
  del argv
  spin_ns = int(_SPIN_US.value * 1000)
  if _CHILD.value:
    wait_in_follow, trigger_in_spin, pairs = _CHILD.value.split(",")
    print(json.dumps(_run_variant(wait_in_follow == "1", trigger_in_spin == "1", int(pairs), spin_ns)))
    return
  rows = []
  for xla_pdl in _XLA_PDL.value:
    env = dict(os.environ)
    if xla_pdl != "default":
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_gpu_enable_pdl={xla_pdl}").strip()
    for variant in ("0,0,1", "1,0,1", "1,1,1", "0,0,3", "1,0,3", "1,1,3"):
      done = subprocess.run([sys.executable, __file__, f"--child={variant}", f"--spin_us={_SPIN_US.value}"],
                            env=env, capture_output=True, text=True, timeout=300)
      lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
      row = json.loads(lines[-1]) if lines else {"variant": variant, "error": done.stderr[-2000:]}
      row["xla_pdl_flag"] = xla_pdl
      print(json.dumps(row), flush=True)
      rows.append(row)
  if _OUT.value:
    tables.write_jsonl(_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)
