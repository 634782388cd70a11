r"""Benchmark of `moe_pallas.moe_layer` on the public workloads, against SPEC.md's floor.

For each workload x scenario x implementation: a first call (compile included: `compile_s`), the output
checked against an independent reference, warm-up calls, then up to --iters timed calls with the L2 flushed before each, as the public benchmark
does (GPU span of one call from its first kernel's start to its last kernel's end; see experiments/timing.py).
Each row also gets the pipelined time (`--pipelined`, on by default; `pipelined_us`, the table's headline
column): moe_layer under one `jax.jit` (offset and scaling factor traced), called N = --pipelined_iters
(default: --iters) times back to back from Python with a chained, donated L2 flush before each call and no
wait in between; per call = (wall time of that loop - the same loop's flushes alone) / N, median of
--pipelined_rounds rounds
(`timing.time_pipelined`). That is what a model sees: launch gaps and host dispatch count where the device
would wait for them, and no profiler is active. The span (`time_us`) stays beside it. A round whose calls
took the host 90 % of its loop or more to enqueue timed the host's dispatch, not the device: the row
counts them (`pipelined_host_bound_rounds`, with `pipelined_enqueue_us` and the flush's own
`pipelined_flush_enqueue_us`) and its log line says HOST-PACED.
Rows go to a JSONL file as they finish (after a header record); a table is printed at the end and written
next to the JSONL as Markdown.

  # GPU (both implementations, the 19 public workloads, uniform routing; about 3 minutes on an H100):
  PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/benchmark.py --implementations=xla,triton \
      --workloads=public --scenarios=uniform --out=$OUT/h100_public.jsonl
  # CPU smoke run (tiny shape, interpret mode, host clock):
  PYTHONPATH=. python3 experiments/benchmark.py --smoke --out=/tmp/smoke.jsonl

Reference (`--reference=auto`): the float64 NumPy oracle (moe_pallas/testing/oracle.py) for T <= --oracle_max_tokens;
above that the xla path with float32 output and highest matmul precision on the device, except for the
xla implementation itself, which is checked against the oracle on --oracle_subset_tokens sampled tokens
(the layer is row-independent, so a token subset is an exact sub-problem). Never the path against itself.

moe_layer is called as a user calls it (not under an outer jit): it validates on the host, then runs one
jitted program per (implementation, T) with the offset as a traced argument; the timer counts only that
program's GPU work. The pipelined mode instead calls it under an outer jit, as a model's step does.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback

from absl import app
from absl import flags

from experiments import reference as reference_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

_IMPLEMENTATIONS = flags.DEFINE_list("implementations", ["xla", "triton"], "moe_layer implementations to time.")
_WORKLOADS = flags.DEFINE_string(
    "workloads", "public", "Comma list of public, extra, all (= public,extra), smoke, T or T@offset "
    "(offsets at DeepSeek-V3 geometry; mapped onto the small shape's ranks).")
_SCENARIOS = flags.DEFINE_list("scenarios", ["uniform"], "Routing scenarios: uniform, skewed, all_local, no_local.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls per row and trial (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls before the timed ones (each after an L2 flush).")
_TRIALS = flags.DEFINE_integer("trials", 1, "Trials with fresh activations (same routing); time = median of "
                               "the trials' medians. Correctness is checked on trial 0.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds_per_row", 15.0, "Wall-time cap of one trial's timed loop; "
                                  "stops early (after >= 3 calls) and records the calls timed.")
_OUT = flags.DEFINE_string("out", "experiments/results/benchmark.jsonl", "JSONL output path (a .md table is "
                           "written next to it).")
_SHAPE = flags.DEFINE_enum("shape", "deepseek_v3", ["deepseek_v3", "small"], "Layer geometry.")
_SMOKE = flags.DEFINE_bool("smoke", False, "CPU smoke mode: small shape, CPU platform, interpret mode, "
                           "host-clock timing, 2 iterations, 5 pipelined rounds of 10 calls, the smoke "
                           "workloads unless --workloads is set.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run the Pallas kernels in interpret mode.")
_REFERENCE = flags.DEFINE_enum("reference", "auto", list(reference_lib.KINDS),
                               "Reference for matched_ratio / rel_l2 (see the module docstring).")
_ORACLE_MAX_TOKENS = flags.DEFINE_integer("oracle_max_tokens", 1024, "auto: full oracle up to this T.")
_ORACLE_SUBSET = flags.DEFINE_integer("oracle_subset_tokens", 128, "Tokens the oracle checks in oracle_subset.")
_ORACLE_WORKERS = flags.DEFINE_integer("oracle_workers", 0, "Host threads for the oracle (0: half the cores).")
_INTERMEDIATE = flags.DEFINE_enum("intermediate_dtype", "float8_e4m3fn", ["float8_e4m3fn", "bfloat16"],
                                  "SwiGLU output precision before GEMM2 on the kernel path.")
_MATRIX_TFLOPS = flags.DEFINE_float("matrix_tflops", 1443.0, "FP8 matrix rate of the floor (cuBLAS 8192^3 "
                                    "on our H100); a higher measured rate would replace it.")
_COPY_MIB = flags.DEFINE_integer("copy_mib", 1024, "Buffer size of the copy-bandwidth measurement.")
_CALIBRATE = flags.DEFINE_bool("calibrate", True, "Time a bf16 8192^3 XLA matmul as a sanity check of the "
                               "timer (GPU only; ~700-800 TFLOP/s on H100).")
_FLUSH_MIB = flags.DEFINE_integer("flush_mib", 256, "L2 flush buffer (>= 2x L2).")
_COMMAND_BUFFERS = flags.DEFINE_bool("command_buffers", False, "Leave XLA command buffers (CUDA graphs) on. "
                                     "Off by default: the public benchmark uses no CUDA graphs, and XLA "
                                     "runs them thunk by thunk under the profiler anyway.")
_PIPELINED = flags.DEFINE_bool("pipelined", True, "Also time each row pipelined (pipelined_us: calls "
                               "enqueued back to back under jit, L2 flushed before each; see the module doc).")
_QUIET_HOST = flags.DEFINE_bool("quiet_host", True, "With --pipelined: finish the host (float64 oracle) "
                                "references before timing any row, so that their threads do not slow the "
                                "host's dispatch in the pipelined loops.")
_PIPELINED_ROUNDS = flags.DEFINE_integer("pipelined_rounds", 15, "Rounds of --iters pipelined calls; "
                                         "pipelined_us is their median (pipelined_min_us the fastest). 15: "
                                         "on the H200 21 rounds of T=1 spread 48.9-58.9 us, so a median of "
                                         "5 moved by +-3 us (PERF 51); the smoke mode uses 5.")
_PIPELINED_ITERS = flags.DEFINE_integer("pipelined_iters", 0, "Calls per pipelined round (0: --iters). The "
                                        "smoke mode uses 10: with 2 the host clock's noise can exceed a "
                                        "tiny layer's time.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", str(REPO / "experiments" / ".jax_cache"),
                                 "Persistent compilation cache ('' to disable).")
_WEIGHT_SEED = flags.DEFINE_integer("weight_seed", 0, "Seed of the one weight set of the run.")
_WEIGHTS_LAYOUT = flags.DEFINE_enum(
    "weights_layout", "spec", ["spec", "block_major"],
    "The expert weights' memory order in the timed calls: SPEC.md's [E, N, K], or block-major [E, N/128, K/128, "
    "128, 128] (`moe_pallas.to_block_major`, reordered once before any row, as a model does when it loads its "
    "weights; moe_layer takes either).")

FLAGS = flags.FLAGS


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _git_commit() -> dict:
  info = {}
  try:
    info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                        check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "moe_pallas", "experiments"], cwd=REPO,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    info["git_dirty"] = bool(dirty)
  except Exception:  # the device machine's copy of the tree has no .git
    info["git_commit"] = "unknown"
  digest = hashlib.sha1()
  for path in sorted((REPO / "moe_pallas").rglob("*.py")) + sorted((REPO / "experiments").glob("*.py")):
    digest.update(str(path.relative_to(REPO)).encode())
    digest.update(path.read_bytes())
  info["source_sha1"] = digest.hexdigest()
  return info


def _layer_fn(implementation: str, config, interpret: bool, intermediate_dtype, workload):
  """moe_layer as a user calls it (it validates, then runs one jitted program per (implementation, T);
  the offset and scaling factor are traced arguments of that program, so offsets share executables)."""
  from moe_pallas import moe_layer
  return functools.partial(moe_layer, local_expert_offset=workload.local_expert_offset,
                           routed_scaling_factor=workload.routed_scaling_factor, config=config,
                           implementation=implementation, interpret=interpret,
                           intermediate_dtype=intermediate_dtype)


@functools.lru_cache(maxsize=None)
def jitted_layer(implementation: str, config, interpret: bool, intermediate_dtype):
  """moe_layer under one jax.jit, as a model's step calls it: the offset and the scaling factor are traced
  arguments (one executable per T, shared by every offset), and the host-side validation runs at trace time
  only, so a call is one program dispatch."""
  import jax
  from moe_pallas import moe_layer

  def layer(logits, bias, hidden, hidden_scale, w1, s1, w2, s2, offset, scaling):
    return moe_layer(logits, bias, hidden, hidden_scale, w1, s1, w2, s2, local_expert_offset=offset,
                     routed_scaling_factor=scaling, config=config, implementation=implementation,
                     interpret=interpret, intermediate_dtype=intermediate_dtype)
  return jax.jit(layer)


def traced_scalars(workload, device) -> tuple:
  """`jitted_layer`'s last two arguments, the workload's offset and scaling factor, as scalars on `device`
  (traced arguments, as a model passes them: offsets share one executable)."""
  import jax
  import jax.numpy as jnp
  return jax.device_put((jnp.int32(workload.local_expert_offset), jnp.float32(workload.routed_scaling_factor)),
                        device)


def jitted_layer_args(config, tokens: int, weights, device):
  """The public workload of `tokens` tokens (uniform routing, workloads.draw) as `jitted_layer`'s arguments
  on `device`: (workload, (activations..., weights..., offset, scaling))."""
  from experiments import workloads
  workload = workloads.select(str(int(tokens)), config)[0]
  draw = workloads.draw(config, workload, "uniform")
  return workload, (*draw.activations(), *weights, *traced_scalars(workload, device))


def pipelined_iters() -> int:
  return _PIPELINED_ITERS.value or _ITERS.value


def pipelined_flush_bytes(gpu: bool) -> int:
  """The pipelined mode's L2 flush: --flush_mib on a GPU; 1 MiB on the CPU (smoke mode), where a flush
  comparable to the tiny layer's time would only add host-clock noise to the subtraction."""
  return _FLUSH_MIB.value * 2**20 if gpu else 2**20


def _pipelined_fields(implementation, config, intermediate_dtype, workload, args, device, floor_us) -> dict:
  """The row's pipelined_* fields (`timing.time_pipelined` of `jitted_layer`) and pipelined_x_floor.

  A failure here is recorded (pipelined_error, pipelined_us None) and does not fail the row: its span and
  correctness were measured already."""
  from experiments import timing
  try:
    layer = jitted_layer(implementation, config, _INTERPRET.value, intermediate_dtype)
    result = timing.time_pipelined(layer, (*args, *traced_scalars(workload, device)), iters=pipelined_iters(),
                                   rounds=_PIPELINED_ROUNDS.value,
                                   flush_bytes=pipelined_flush_bytes(device.platform == "gpu"), device=device)
  except Exception as e:  # noqa: BLE001 - recorded in the row
    traceback.print_exc()
    return dict(pipelined_us=None, pipelined_x_floor=None, pipelined_error=f"{type(e).__name__}: {e}"[:4000])
  result["pipelined_x_floor"] = result["pipelined_us"] / floor_us if floor_us > 0 else None
  return result


def command_buffers_state(xla_flags: str) -> str:
  """Whether XLA command buffers (CUDA graphs) are on, from XLA_FLAGS: the last
  --xla_gpu_enable_command_buffer wins; an empty value turns them off; absent means XLA's default (on)."""
  state = "on (XLA default)"
  for token in xla_flags.split():
    if token.startswith("--xla_gpu_enable_command_buffer="):
      value = token.split("=", 1)[1]
      state = "off" if not value else f"on ({value})"
  return state


def _fmt(v, spec):
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


TABLE_COLUMNS = (("implementation", "impl", "s"), ("scenario", "scenario", "s"), ("T", "T", "d"),
                 ("local_expert_offset", "offset", "d"), ("pairs", "pairs", "d"),
                 ("experts_touched", "experts", "d"), ("floor_us", "floor µs", ".1f"),
                 ("pipelined_us", "pipelined µs", ".1f"), ("pipelined_x_floor", "pipelined ×floor", ".2f"),
                 ("time_us", "span µs", ".1f"), ("time_over_floor", "span ×floor", ".2f"),
                 ("tflops", "TFLOP/s", ".3g"), ("gbps", "GB/s", ".0f"), ("matched_ratio", "matched", ".4f"),
                 ("rel_l2", "rel_l2", ".2e"), ("reference", "ref", "s"), ("compile_s", "compile s", ".1f"),
                 ("num_kernels", "kernels", "d"), ("iters_timed", "iters", "d"))


def table_markdown(rows) -> str:
  head = "| " + " | ".join(c[1] for c in TABLE_COLUMNS) + " | status |"
  sep = "|" + "|".join("---" for _ in range(len(TABLE_COLUMNS) + 1)) + "|"
  lines = [head, sep]
  for r in rows:
    cells = [_fmt(r.get(k), spec) if spec != "s" else str(r.get(k, "-")) for k, _, spec in TABLE_COLUMNS]
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:80]}"
    lines.append("| " + " | ".join(cells) + f" | {status} |")
  # Geometric means of pipelined / floor and span / floor per implementation and scenario (ok rows).
  blank = False
  for key, label in (("pipelined_x_floor", "pipelined/floor"), ("time_over_floor", "time/floor")):
    groups = {}
    for r in rows:
      if r["status"] == "ok" and r.get(key) and r[key] > 0:
        groups.setdefault((r["implementation"], r["scenario"]), []).append(r[key])
    if groups and not blank:
      lines.append("")
      blank = True
    for (impl, scen), vals in sorted(groups.items()):
      geo = math.exp(sum(math.log(v) for v in vals) / len(vals))
      lines.append(f"geomean {label} {impl} {scen}: {geo:.3f} over {len(vals)} rows")
  return "\n".join(lines)


def _configure_jax():
  if not _COMMAND_BUFFERS.value:
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_command_buffer" not in xla_flags:
      os.environ["XLA_FLAGS"] = (xla_flags + " --xla_gpu_enable_command_buffer=").strip()
  import jax
  if _SMOKE.value:
    jax.config.update("jax_platforms", "cpu")
  if _CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return jax


def _apply_smoke_defaults():
  if _SMOKE.value:
    for name, value in (("shape", "small"), ("interpret", True), ("iters", 2), ("warmup", 1),
                        ("pipelined_iters", 10), ("pipelined_rounds", 5), ("workloads", "smoke")):
      if not FLAGS[name].present:
        FLAGS[name].value = value


@dataclasses.dataclass
class Machine:
  """The device, its timer and the rates of the floor, measured once per run."""

  device: object
  gpu: bool
  timer: object
  copy: dict
  matrix_flops: float
  matrix_source: str
  calibration: dict

  @property
  def copy_bw(self) -> float:
    return self.copy["copy_bw_Bps"]


def _measure_machine(jax) -> Machine:
  import jax.numpy as jnp

  from experiments import timing
  device = jax.devices()[0]
  gpu = device.platform == "gpu"
  if not gpu and not _SMOKE.value:
    log(f"WARNING: no GPU ({device.platform}); timing falls back to the host clock and is not a GPU measurement")
  timer = timing.make_timer(gpu=gpu, device=device, flush_bytes=_FLUSH_MIB.value * 2**20,
                            command_buffers="on" if _COMMAND_BUFFERS.value else "off")
  copy = timing.measure_copy_bandwidth(timer, nbytes=_COPY_MIB.value * 2**20 if gpu else 2**24,
                                       iters=10 if gpu else 3)
  log(f"copy bandwidth {copy['copy_bw_Bps'] / 1e12:.3f} TB/s (read+write; elementwise "
      f"{copy['copy_bw_elementwise_Bps'] / 1e12:.3f}, jnp.copy {copy['copy_bw_copy_Bps'] / 1e12:.3f})")
  calibration = {}
  matrix_flops = _MATRIX_TFLOPS.value * 1e12
  matrix_source = f"--matrix_tflops={_MATRIX_TFLOPS.value} (cuBLAS FP8 8192^3 on our H100)"
  if gpu and _CALIBRATE.value:
    calibration["bf16_matmul_8192_tflops"] = timing.measure_matmul_rate(timer) / 1e12
    calibration["fp8_xla_dot_8192_tflops"] = timing.measure_matmul_rate(timer, dtype=jnp.float8_e4m3fn) / 1e12
    log(f"timer check: XLA 8192^3 matmul bf16 {calibration['bf16_matmul_8192_tflops']:.0f} TFLOP/s "
        f"(H100: ~800 expected), fp8 {calibration['fp8_xla_dot_8192_tflops']:.0f} TFLOP/s")
    if calibration["fp8_xla_dot_8192_tflops"] * 1e12 > matrix_flops:
      matrix_flops = calibration["fp8_xla_dot_8192_tflops"] * 1e12
      matrix_source = "measured: XLA FP8 8192^3 dot in this run"
  return Machine(device=device, gpu=gpu, timer=timer, copy=copy, matrix_flops=matrix_flops,
                 matrix_source=matrix_source, calibration=calibration)


def _header(jax, machine: Machine, config) -> dict:
  import moe_pallas
  from experiments import timing
  device = machine.device
  return dict(
      record="header", device=device.device_kind, platform=device.platform, jax_version=jax.__version__,
      moe_pallas_version=moe_pallas.__version__, python=platform.python_version(), **_git_commit(),
      flags={f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.modules[__name__])},
      argv=sys.argv, xla_flags=os.environ.get("XLA_FLAGS", ""), timing_method=machine.timer.method,
      command_buffers=command_buffers_state(os.environ.get("XLA_FLAGS", "")),
      pipelined_method=timing.pipelined_method(device.platform, iters=pipelined_iters(), rounds=_PIPELINED_ROUNDS.value,
                                               flush_bytes=pipelined_flush_bytes(machine.gpu)) if _PIPELINED.value else None,
      copy_bw_Bps=machine.copy_bw, copy=machine.copy, matrix_flops=machine.matrix_flops,
      matrix_flops_source=machine.matrix_source,
      calibration=machine.calibration, config=dataclasses.asdict(config),
      routing="synthetic (moe_pallas.testing.random_activations), fixed seed per workload x scenario; "
              "see experiments/workloads.py",
      floor="max(bytes / copy_bw, flops / matrix_flops); bytes = touched experts' FP8 weights + scales + "
            "activations in/out; flops = 2 * pairs * 3 * H * I (experiments/floor.py)",
      started_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _draw_all(config, workloads, references) -> list:
  """Every routing draw (cheap), with the host references started in the background:
  (workload, scenario, draw or None, error or None, seconds) per workload x scenario."""
  from experiments import workloads as workloads_lib
  draws = []
  t0 = time.perf_counter()
  for workload in workloads:
    for scenario in _SCENARIOS.value:
      td = time.perf_counter()
      try:
        d, err = workloads_lib.draw(config, workload, scenario), None
        for impl in _IMPLEMENTATIONS.value:
          references.submit(d, references.kind_for(impl, workload.num_tokens))
      except Exception as e:  # noqa: BLE001 - recorded in the rows
        d, err = None, f"{type(e).__name__}: {e}"
      draws.append((workload, scenario, d, err, time.perf_counter() - td))
  log(f"{len(draws)} routing draws in {time.perf_counter() - t0:.1f}s; host references started")
  return draws


def _time_trials(layer, args, draw, weights, machine: Machine, fl) -> dict:
  """The span fields of a row: --trials x (--iters timed calls, median), the median of the trials."""
  trial_medians, trial_results = [], []
  for trial in range(_TRIALS.value):
    targs = args if trial == 0 else (*draw.activations(trial), *weights)
    times = machine.timer.time_calls(layer, targs, iters=_ITERS.value, warmup=_WARMUP.value,
                                     max_seconds=_MAX_SECONDS.value)
    trial_medians.append(times.median_us)
    trial_results.append(times)
  time_us = statistics.median(trial_medians)
  return dict(trial_results[0].summary(), time_us=time_us, trial_time_us=trial_medians,
              capped=any(len(t.span_us) < _ITERS.value for t in trial_results),
              iters_requested=_ITERS.value, kernels=[list(k) for k in trial_results[0].kernels],
              time_over_floor=time_us / fl.floor_us if fl.floor_us > 0 else None,
              tflops=fl.flops / (time_us * 1e-6) / 1e12, gbps=fl.bytes / (time_us * 1e-6) / 1e9)


def _check_fields(impl, draw, got, references) -> dict:
  """The correctness fields of a row: `got` against the row's reference under SPEC.md's criterion."""
  from moe_pallas import testing
  kind = references.kind_for(impl, draw.workload.num_tokens)
  if kind == "none":
    return dict(reference="none", matched_ratio=None, rel_l2=None, passed=None)
  tr = time.perf_counter()
  ref, ref_rows, label, ref_s = references.get(draw, kind)
  metrics = testing.acceptance_metrics(got if ref_rows is None else got[ref_rows], ref)
  return dict(reference=label, matched_ratio=float(metrics["matched_ratio"]), rel_l2=float(metrics["rel_l2"]),
              finite=bool(metrics["finite"]), passed=bool(metrics["passed"]), reference_s=ref_s,
              reference_wait_s=time.perf_counter() - tr)


def _run_row(impl, workload, scenario, draw, draw_error, draw_s, *, config, weights, machine: Machine,
             references, compiled: dict, intermediate_dtype) -> dict:
  """One row: floor, first (compiling) call, span timing, pipelined timing, check. Never raises."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from experiments import floor as floor_lib
  row = dict(record="row", device=machine.device.device_kind, implementation=impl, scenario=scenario,
             T=workload.num_tokens, local_expert_offset=workload.local_expert_offset,
             workload_group=workload.group, routed_scaling_factor=workload.routed_scaling_factor,
             shape=_SHAPE.value, intermediate_dtype=_INTERMEDIATE.value, interpret=_INTERPRET.value,
             weights_layout=_WEIGHTS_LAYOUT.value)
  t_row = time.perf_counter()
  try:
    if draw is None:
      raise RuntimeError(f"routing draw failed: {draw_error}")
    row.update(draw.describe(), draw_s=draw_s)
    fl = floor_lib.floor(config, num_tokens=workload.num_tokens, pairs=draw.pairs,
                         experts_touched=draw.experts_touched, copy_bw_Bps=machine.copy_bw,
                         matrix_flops=machine.matrix_flops)
    row.update(floor_us=fl.floor_us, floor_memory_us=fl.memory_us, floor_compute_us=fl.compute_us,
               floor_bound=fl.bound, bytes=fl.bytes, flops=fl.flops, arithmetic_intensity=fl.arithmetic_intensity)
    layer = _layer_fn(impl, config, _INTERPRET.value, intermediate_dtype, workload)
    args = tuple(draw.activations(0)) + tuple(weights)
    key = (impl, workload.num_tokens)
    row["compiled_here"] = key not in compiled
    tc = time.perf_counter()
    out = jax.block_until_ready(layer(*args))
    first_call_s = time.perf_counter() - tc
    compiled.setdefault(key, first_call_s)
    row.update(compile_s=compiled[key], first_call_s=first_call_s)
    got = np.asarray(out.astype(jnp.float32))
    del out
    row.update(_time_trials(layer, args, draw, weights, machine, fl))
    if _PIPELINED.value:
      row.update(_pipelined_fields(impl, config, intermediate_dtype, workload, args, machine.device, fl.floor_us))
    row.update(_check_fields(impl, draw, got, references))
    row["status"] = "ok"
  except NotImplementedError as e:
    row.update(status="unsupported", error=f"NotImplementedError: {e}")
  except Exception as e:  # noqa: BLE001 - one failing row must not end the run
    row.update(status="error", error=f"{type(e).__name__}: {e}"[:4000])
    traceback.print_exc()
  row["row_wall_s"] = time.perf_counter() - t_row
  return row


def _log_row(index: int, total: int, row: dict, t_run: float):
  head = f"[{index}/{total}] {row['implementation']:6s} {row['scenario']:9s} T={row['T']:<6d}"
  if row["status"] != "ok":
    log(f"{head} {row['status'].upper()}: {row['error'][:300]}")
    return
  host_bound = row.get("pipelined_host_bound_rounds")
  # The host's part of a paced round: enqueueing a flush + call, and a flush alone (the call's own share is
  # the difference; PERF 60).
  paced = (f" (HOST-PACED in {host_bound} of {row['pipelined_rounds']} rounds: host {row['pipelined_enqueue_us']:.0f}"
           f" us a flush + call, {row['pipelined_flush_enqueue_us']:.0f} a flush)" if host_bound else "")
  log(f"{head} off={row['local_expert_offset']:<3d} pairs={row['pairs']:<6d} experts={row['experts_touched']:<2d} "
      f"pipelined={_fmt(row.get('pipelined_us'), '9.1f')}us{paced} span={row['time_us']:9.1f}us "
      f"floor={row['floor_us']:8.1f}us x{_fmt(row['time_over_floor'], '.2f')} "
      f"matched={_fmt(row.get('matched_ratio'), '.4f')} rel_l2={_fmt(row.get('rel_l2'), '.2e')} "
      f"({row.get('reference')}) compile={row['compile_s']:.1f}s{'' if row['compiled_here'] else '(reused)'} "
      f"iters={row['iters_timed']} row={row['row_wall_s']:.1f}s total={time.perf_counter() - t_run:.0f}s")


def _write_markdown(path: pathlib.Path, rows, header: dict, machine: Machine) -> str:
  table = table_markdown(rows)
  # On the device machine the tree is a copy whose git HEAD may be stale: then the commit is marked as
  # differing, and source_sha1 (the hash of moe_pallas/ and experiments/ as run) names the code.
  commit = header["git_commit"] + (" + changes" if header.get("git_dirty") else "")
  path.write_text(f"device: {header['device']}; jax {header['jax_version']}; commit {commit}; source_sha1 "
                  f"{header['source_sha1'][:12]}\n\n"
                  f"timing (span): {machine.timer.method}; XLA command buffers {header['command_buffers']}\n\n"
                  f"pipelined (headline): {header['pipelined_method']}\n\n"
                  f"floor: copy {machine.copy_bw / 1e12:.3f} TB/s, FP8 matrix {machine.matrix_flops / 1e12:.0f} "
                  f"TFLOP/s\n\n{table}\n")
  return table


def main(argv):
  del argv
  _apply_smoke_defaults()
  jax = _configure_jax()
  import jax.numpy as jnp

  from experiments import workloads as workloads_lib
  from moe_pallas import testing, weight_layout
  from moe_pallas.config import MoEConfig

  t_run = time.perf_counter()
  config = MoEConfig.deepseek_v3() if _SHAPE.value == "deepseek_v3" else MoEConfig.small()
  workloads = workloads_lib.select(_WORKLOADS.value, config)
  for s in _SCENARIOS.value:
    if s not in workloads_lib.SCENARIOS:
      raise app.UsageError(f"--scenarios: {s!r} is not one of {workloads_lib.SCENARIOS}")
  log(f"device {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), jax {jax.__version__}; "
      f"{len(workloads)} workloads x {len(_SCENARIOS.value)} scenarios x {len(_IMPLEMENTATIONS.value)} implementations")
  machine = _measure_machine(jax)
  header = _header(jax, machine, config)
  out_path = pathlib.Path(_OUT.value)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  log(f"timing: {machine.timer.method}; command buffers {header['command_buffers']}")
  log(f"pipelined: {header['pipelined_method']}")
  log(f"floor: copy {machine.copy_bw / 1e12:.3f} TB/s, FP8 matrix {machine.matrix_flops / 1e12:.0f} TFLOP/s; "
      f"writing {out_path}")

  with open(out_path, "w") as out_file:
    def emit(record):
      out_file.write(json.dumps(record) + "\n")
      out_file.flush()

    emit(header)
    t0 = time.perf_counter()
    weights = jax.block_until_ready(testing.random_weights(config, seed=_WEIGHT_SEED.value))
    log(f"weights generated ({sum(w.nbytes for w in weights) / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f}s")
    references = reference_lib.References(
        config, weights, requested=_REFERENCE.value, oracle_max_tokens=_ORACLE_MAX_TOKENS.value,
        oracle_subset_tokens=_ORACLE_SUBSET.value,
        workers=_ORACLE_WORKERS.value or max(1, (os.cpu_count() or 2) // 2))
    draws = _draw_all(config, workloads, references)
    if _WEIGHTS_LAYOUT.value == "block_major":  # the references keep the SPEC order
      weights = jax.block_until_ready(weight_layout.experts_in_layout(weights, "block_major"))
      log("weights reordered block-major for the timed calls")
    if _PIPELINED.value and _QUIET_HOST.value:
      # The oracle's threads hold the GIL in parts: running beside the pipelined loops they slowed the
      # host's dispatch below the device's pace and made T <= 14 rounds swing from -20 to 196 us (the H200
      # run of 2026-11-30, T=1: 55 us of kernels). The pipelined number needs a quiet host.
      log(f"host references done after {references.wait_all():.1f}s more (--quiet_host)")
    compiled = {}  # (implementation, T) -> seconds of the first call (compile + one run)
    rows = []
    total = len(draws) * len(_IMPLEMENTATIONS.value)
    for slot, (workload, scenario, draw, draw_error, draw_s) in enumerate(draws):
      for impl in _IMPLEMENTATIONS.value:
        row = _run_row(impl, workload, scenario, draw, draw_error, draw_s, config=config, weights=weights,
                       machine=machine, references=references, compiled=compiled,
                       intermediate_dtype=jnp.dtype(_INTERMEDIATE.value))
        rows.append(row)
        emit(row)
        _log_row(len(rows), total, row, t_run)
      if draw is not None:
        references.release(draw)
      draws[slot] = None  # frees the draw's arrays
    references.shutdown()
    emit(dict(record="footer", wall_s=time.perf_counter() - t_run, rows=len(rows),
              ok=sum(r["status"] == "ok" for r in rows)))
  md_path = out_path.with_suffix(".md")
  print(_write_markdown(md_path, rows, header, machine), flush=True)
  log(f"done: {len(rows)} rows in {time.perf_counter() - t_run:.0f}s -> {out_path}, {md_path}")


if __name__ == "__main__":
  app.run(main)
