"""The benchmark harness (experiments/) stays runnable: CPU smoke run, plot, floor and timer bookkeeping."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import floor as floor_lib
from experiments import timing
from experiments import workloads as workloads_lib
from moe_pallas.config import MoEConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
ROW_KEYS = ("device", "implementation", "scenario", "T", "local_expert_offset", "pairs", "experts_touched",
            "floor_us", "time_us", "matched_ratio", "rel_l2")
HEADER_KEYS = ("device", "jax_version", "git_commit", "flags", "copy_bw_Bps", "matrix_flops", "timing_method",
               "command_buffers", "pipelined_method")
# Fields of every row that the peer harness (side_by_side.py) and the results tables read.
ROW_TIMING_KEYS = ("time_us", "kernel_sum_us", "num_kernels", "floor_us", "passed", "device", "pipelined_us")
# On the CPU's host clock a tiny layer's pipelined time (loop minus flush-only loop) can come out at or
# below zero on a busy machine, so the smoke rows require it finite, and the flush loop positive.
PIPELINED_POSITIVE = ("pipelined_flush_us", "pipelined_loop_us", "pipelined_enqueue_us",
                      "pipelined_flush_enqueue_us")
PIPELINED_FINITE = ("pipelined_us", "pipelined_x_floor")


def _positive_finite(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _run(args, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
  return result


def test_smoke_benchmark_and_plot(tmp_path):
  implementations = ["xla", "triton"]  # both, always: a broken kernel path must fail here, not drop out
  out = tmp_path / "smoke.jsonl"
  _run(["experiments/benchmark.py", "--smoke", f"--implementations={','.join(implementations)}",
        "--scenarios=uniform,all_local,no_local", f"--out={out}", f"--cache_dir={tmp_path / 'cache'}"], tmp_path)

  records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
  header, rows = records[0], [r for r in records if r.get("record") == "row"]
  assert header["record"] == "header"
  for key in HEADER_KEYS:
    assert key in header, f"header lacks {key}"
  assert header["timing_method"].startswith("host_clock"), header["timing_method"]
  assert header["pipelined_method"].startswith("pipelined_host_clock"), header["pipelined_method"]
  assert header["command_buffers"] == "off"  # the benchmark's default (--command_buffers=false)
  assert len(rows) == len(workloads_lib.SMOKE) * 3 * len(implementations)
  for row in rows:
    assert row["status"] == "ok", row
    for key in ROW_KEYS:
      assert key in row, f"row lacks {key}: {row}"
    assert row["iters_timed"] == 2
    for key in ROW_TIMING_KEYS:
      assert key in row, f"row lacks {key}: {row}"
    for key in PIPELINED_POSITIVE:
      assert _positive_finite(row[key]), f"{key}={row.get(key)!r} in {row}"
    for key in PIPELINED_FINITE:
      assert math.isfinite(row[key]), f"{key}={row.get(key)!r} in {row}"
    # Smoke mode: 10 pipelined calls per round (--pipelined_iters), 5 rounds.
    assert row["pipelined_iters"] == 10 and len(row["pipelined_rounds_us"]) == 5
    assert all(math.isfinite(v) for v in row["pipelined_rounds_us"]) and math.isfinite(row["pipelined_min_us"])
    assert row["pipelined_min_us"] <= row["pipelined_us"]
    assert row["pipelined_x_floor"] == pytest.approx(row["pipelined_us"] / row["floor_us"])
    assert row["pipelined_method"].startswith("pipelined_host_clock"), row["pipelined_method"]
    assert row["passed"], (f"{row['implementation']} {row['scenario']} T={row['T']}: "
                           f"matched_ratio={row['matched_ratio']:.4f} rel_l2={row['rel_l2']:.3e}")
    assert row["matched_ratio"] >= 0.9
    if row["scenario"] == "no_local":
      assert row["pairs"] == 0 and row["experts_touched"] == 0
    if row["scenario"] == "all_local":
      assert row["pairs"] == row["T"] * MoEConfig.small().top_k
  assert {r["implementation"] for r in rows} == set(implementations)
  table = out.with_suffix(".md").read_text()
  assert table.count("| ok |") == len(rows)
  # The pipelined time is the headline column; the span stays beside it.
  head = next(line for line in table.splitlines() if line.startswith("| impl"))
  assert head.index("pipelined µs") < head.index("span µs")

  png = tmp_path / "smoke.png"
  _run(["experiments/plot.py", f"--inputs={out}", f"--out={png}"], tmp_path)
  assert png.stat().st_size > 10_000


def test_floor_matches_spec():
  config = MoEConfig.deepseek_v3()
  assert floor_lib.expert_bytes(config) == 4096 * 7168 + 7168 * 2048 + 4 * (32 * 56 + 56 * 16)  # 44.05 MB
  assert floor_lib.flops_per_pair(config) == 88_080_384
  # ANCHORS.md, T=1 at offset 32: 3 pairs on 3 experts, 44.1 µs at 3.0 TB/s.
  fl = floor_lib.floor(config, num_tokens=1, pairs=3, experts_touched=3, copy_bw_Bps=3.0e12)
  assert fl.bound == "memory" and fl.floor_us == pytest.approx(44.06, abs=0.05)
  # all_local T=14107: 112856 pairs, compute-bound at 1443 TFLOP/s: 6888.7 µs.
  fl = floor_lib.floor(config, num_tokens=14107, pairs=112856, experts_touched=32, copy_bw_Bps=3.0e12)
  assert fl.bound == "compute" and fl.floor_us == pytest.approx(6888.7, abs=0.5)


def test_public_workloads():
  config = MoEConfig.deepseek_v3()
  public = workloads_lib.select("public", config)
  assert len(public) == 19
  assert [(w.num_tokens, w.local_expert_offset) for w in public] == list(workloads_lib.PUBLIC)
  assert all(w.routed_scaling_factor == 2.5 for w in public)
  assert len(workloads_lib.select("all", config)) == 19 + len(workloads_lib.EXTRA)
  assert [(w.num_tokens, w.local_expert_offset) for w in workloads_lib.select("901,5@64", config)] == [(901, 96), (5, 64)]
  small = MoEConfig.small()
  assert {w.local_expert_offset for w in workloads_lib.select("public", small)} <= {0, 8, 16, 24}


def test_uniform_draw_has_a_local_pair_and_is_fixed():
  config = MoEConfig.small()
  workload = workloads_lib.Workload(1, 8, "custom")
  first = workloads_lib.draw(config, workload, "uniform")
  again = workloads_lib.draw(config, workload, "uniform")
  assert first.pairs >= 1 and first.seed == again.seed
  assert jnp.array_equal(first.routing_logits, again.routing_logits)
  # A fresh trial keeps the routing and redraws the activations.
  logits, _, hidden, _ = first.activations(1)
  assert jnp.array_equal(logits, first.routing_logits)
  assert not jnp.array_equal(hidden.astype(jnp.float32), first.hidden_states.astype(jnp.float32))


def _event(name, start, end, module):
  return timing._Event(name, float(start), float(end), module)


def test_span_split_by_hlo_module():
  flush, prog = timing.FLUSH_MODULE, "jit_moe"
  events = [_event("flush", 0, 100, flush), _event("memcpy", 105, 106, None),  # wrapper's H2D, not the program
            _event("k1", 110, 120, prog), _event("k2", 150, 170, prog),
            _event("flush", 200, 300, flush), _event("k1", 310, 315, prog), _event("k2", 330, 340, prog)]
  calls, method = timing._split_calls(events, 2, {"flush"}, 1)
  assert method == "hlo_module"
  assert [[e.name for e in c] for c in calls] == [["k1", "k2"], ["k1", "k2"]]
  spans = [max(e.end_ns for e in c) - min(e.start_ns for e in c) for c in calls]
  assert spans == [60, 30]  # first start to last end: the gap between k1 and k2 counts


def test_span_split_by_flush_pattern():
  events = [_event("flush", 0, 100, None), _event("k1", 110, 120, None), _event("k2", 130, 140, None),
            _event("flush", 200, 300, None), _event("k1", 310, 320, None), _event("k2", 330, 345, None)]
  calls, method = timing._split_calls(events, 2, {"flush"}, 1)
  assert method == "flush_pattern" and [len(c) for c in calls] == [2, 2]
  with pytest.raises(RuntimeError):
    timing._split_calls(events[:-1], 2, {"flush"}, 1)


def _platform_device(platform):
  """The first device of `platform` ("cpu" exists beside a GPU unless JAX_PLATFORMS excludes it)."""
  try:
    return jax.devices(platform)[0]
  except RuntimeError:
    pytest.skip(f"no {platform} device in this process")


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_time_pipelined(platform):
  """time_pipelined on the device its arguments live on, labelled with that device's clock.

  The arguments are placed explicitly: on a GPU machine the default device is the GPU, so an unplaced
  array would time the GPU program under the CPU case's labels ("host_clock"). The CPU case also asserts
  positive per-call times: ~0.5 GFLOP per call against a 1 MiB flush stays well above the host clock's
  noise on a CPU. On a GPU the same product takes microseconds, within the dispatch noise of the host
  (other test processes share it), so there only the loops' own wall times must be positive and the
  per-call difference finite (the benchmark's GPU rows are judged the same way)."""
  device = _platform_device(platform)
  x = jax.device_put(jnp.ones((512, 512), jnp.float32), device)
  jitted = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
  calls = []

  def fn(x):  # counts the calls: every one is enqueued (async dispatch), none is skipped
    calls.append(1)
    return jitted(x)

  iters, rounds = 4, 3
  result = timing.time_pipelined(fn, (x,), iters=iters, rounds=rounds, flush_bytes=2**20)
  assert len(calls) == 1 + timing.PIPELINED_WARMUP + iters * rounds
  assert jitted(x).devices() == {device}
  for key in ("pipelined_flush_us", "pipelined_loop_us"):
    assert _positive_finite(result[key]), (key, result)
  assert result["pipelined_iters"] == iters and len(result["pipelined_rounds_us"]) == rounds
  assert all(math.isfinite(v) for v in result["pipelined_rounds_us"])
  assert result["pipelined_min_us"] <= result["pipelined_us"] <= result["pipelined_max_us"]
  assert 0 < result["pipelined_enqueue_us"] <= result["pipelined_loop_us"]
  assert 0 < result["pipelined_flush_enqueue_us"] <= result["pipelined_flush_us"]
  assert 0 <= result["pipelined_host_bound_rounds"] <= rounds
  assert result["pipelined_devices"] == 1
  if platform == "cpu":
    for key in ("pipelined_us", "pipelined_min_us"):
      assert _positive_finite(result[key]), (key, result)
    assert result["pipelined_loop_us"] > result["pipelined_flush_us"]
    assert result["pipelined_clock"] == "host_clock"
    assert result["pipelined_method"].startswith("pipelined_host_clock")
  else:
    assert result["pipelined_clock"] == "device_wall"
    assert result["pipelined_method"].startswith("pipelined_device_wall")
  with pytest.raises(ValueError):
    timing.time_pipelined(fn, (x,), iters=0)


def test_time_pipelined_flags_rounds_paced_by_the_host():
  """A call whose host work outlasts its device work (here a 30 ms sleep before a tiny program): every round
  is counted host-paced, and the host's enqueue time is about the whole loop's. The sleep is long against
  the last call's run after the last enqueue: with 3 ms, the GPU machine's six parallel test groups once
  stretched that tail past a tenth of the loop (one round of two counted)."""
  x = jax.device_put(jnp.ones((8,), jnp.float32), _platform_device("cpu"))
  jitted = jax.jit(lambda x: x + 1)

  def slow_host_call(x):
    time.sleep(30e-3)
    return jitted(x)

  result = timing.time_pipelined(slow_host_call, (x,), iters=3, rounds=2, flush_bytes=2**20)
  assert result["pipelined_host_bound_rounds"] == 2, result
  assert result["pipelined_enqueue_us"] >= 30000 and result["pipelined_enqueue_us"] >= 0.9 * result["pipelined_loop_us"]
  # The flush alone does not sleep: the difference, the call's own share of the host, holds the 30 ms.
  assert result["pipelined_enqueue_us"] - result["pipelined_flush_enqueue_us"] >= 27000


def test_chained_flusher_donates_and_chains():
  flusher = timing.ChainedFlusher(2**16, jax.devices()[:1])  # the constructor runs one flush
  for _ in range(5):
    flusher.enqueue()  # no host wait: each flush takes the previous one's (donated) buffer
  flusher.sync()
  assert flusher.buffer.shape == (2**14,) and int(flusher.buffer[0]) == int(flusher.buffer[-1]) == 6


def test_dispatch_cost_counts_calls_and_entry_instructions():
  from experiments import dispatch_cost
  calls = []
  jitted = jax.jit(lambda x: x * 2)
  x = jnp.ones((4,), jnp.float32)

  def call():
    calls.append(1)
    return jitted(x)

  result = dispatch_cost.enqueue_cost(call, calls=4, rounds=3)
  assert len(calls) == 1 + 4 * 3  # one untimed call, then rounds x calls
  assert len(result["enqueue_rounds_us"]) == 3 and result["enqueue_us"] > 0
  assert result["wall_us"] >= result["enqueue_min_us"]
  with pytest.raises(ValueError, match="calls and rounds"):
    dispatch_cost.enqueue_cost(call, calls=0, rounds=1)
  # Multi-output instructions have a tuple shape before the opcode; custom calls count under their target;
  # instructions of other computations do not count.
  hlo = """HloModule m
%fused (q: f32[2]) -> f32[2] {
  ROOT %n = f32[2]{0} negate(f32[2]{0} %q)
}
ENTRY %main (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  %cc = (f32[2]{0}, s32[4]{0}) custom-call(f32[2]{0} %p), custom_call_target="__gpu$xla.gpu.triton"
  %g = f32[2]{0} get-tuple-element((f32[2]{0}, s32[4]{0}) %cc), index=0
  ROOT %f = f32[2]{0} fusion(f32[2]{0} %g), kind=kLoop, calls=%fused
}
"""
  assert dispatch_cost.entry_opcodes(hlo) == {"custom-call __gpu$xla.gpu.triton": 1, "fusion": 1,
                                              "get-tuple-element": 1, "parameter": 1}
  assert dispatch_cost.entry_opcodes(jax.jit(lambda a: a + 1).lower(x).compile().as_text())


def test_jsonl_round_trip(tmp_path):
  from experiments import tables
  records = [{"T": 1, "kernels": [["moe_route", 3.9]]}, {"record": "header", "device": "NVIDIA H200"}]
  path = tmp_path / "rows.jsonl"
  tables.write_jsonl(path, records)
  assert path.read_text().count("\n") == 2 and tables.read_jsonl(path) == records
  tables.write_jsonl(path, records[:1])  # replaced, not appended
  assert tables.read_jsonl(path) == records[:1]


def test_command_buffers_state():
  from experiments import benchmark
  assert benchmark.command_buffers_state("") == "on (XLA default)"
  assert benchmark.command_buffers_state("--foo=1 --xla_gpu_enable_command_buffer=") == "off"
  assert benchmark.command_buffers_state("--xla_gpu_enable_command_buffer= "
                                         "--xla_gpu_enable_command_buffer=FUSION") == "on (FUSION)"


def test_scripts_are_a_package_without_path_edits():
  """experiments/ imports as a package (`python -m experiments.<script>`, or PYTHONPATH=. for the scripts)."""
  for path in sorted((REPO / "experiments").glob("*.py")):
    assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "experiments.run_layer", "--helpfull"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  # absl's --helpfull exits with status 1 after printing the flags; an import error prints none of them.
  assert "--oracle_max_tokens" in result.stdout + result.stderr, result.stderr[-3000:]


def test_reference_kinds():
  from experiments import reference as reference_lib
  assert reference_lib.kind_for("auto", "triton", 1024, oracle_max_tokens=1024) == "oracle"
  assert reference_lib.kind_for("auto", "triton", 1025, oracle_max_tokens=1024) == "xla"
  assert reference_lib.kind_for("auto", "xla", 1025, oracle_max_tokens=1024) == "oracle_subset"  # never itself
  assert reference_lib.kind_for("none", "xla", 5, oracle_max_tokens=1024) == "none"
  with pytest.raises(ValueError, match="reference kind"):
    reference_lib.kind_for("oracle_small", "xla", 5, oracle_max_tokens=1024)
  assert reference_lib.sample_rows(64, 64, seed=1) is None
  rows = reference_lib.sample_rows(1000, 64, seed=1)
  assert len(set(rows.tolist())) == 64 and list(rows) == sorted(rows)
  assert np.array_equal(rows, reference_lib.sample_rows(1000, 64, seed=1))


def test_smoke_reliability_check(tmp_path):
  """experiments/reliability_check.py --smoke: determinism records identical, memory records without OOM,
  fewer bucketed compiles than distinct T; JSONL and Markdown written."""
  out = tmp_path / "reliability"
  _run(["-m", "experiments.reliability_check", "--smoke", f"--out={out}", "--determinism_T=1,37",
        "--memory_T=64", "--sweep_count=8", "--sweep_max_T=70"], tmp_path)
  records = [json.loads(line) for line in (out / "reliability.jsonl").read_text().splitlines() if line.strip()]
  kinds = [r["kind"] for r in records]
  assert kinds == ["header", "determinism", "determinism", "memory", "recompiles"], kinds
  assert all(r["same_program_identical"] and r["recompile_identical"] for r in records if r["kind"] == "determinism")
  memory = records[3]
  assert memory["oom"] is False and memory["finite"] and memory["compile_s"] > 0
  assert memory["temp_size_in_bytes"] > 0 and memory["output_size_in_bytes"] == 64 * 256 * 2  # [T, H] bf16
  sweep = records[4]
  assert sweep["bucketed_compiles"] == len(sweep["buckets"]) < sweep["distinct_T"]
  assert "## Recompiles over a sweep of T" in (out / "reliability.md").read_text()


_TUNE_VARIANTS_CHECK = """
import sys
from experiments import tune_tiles
from moe_pallas.kernels.tiling import MoETiling, default_tiling
device_kind = sys.argv[1]
for num_tokens in (1, 7, 16, 57, 80):
  base = default_tiling(num_tokens, 8, 32, device_kind=device_kind)
  variants = tune_tiles.small_t_variants(base) + tune_tiles.split_k_variants()
  assert all(isinstance(tiles, MoETiling) for _, tiles, _, _ in variants)
  assert len({name for name, *_ in variants}) == len(variants), "names must tell the rows apart"
for num_tokens in (901, 14107):
  variants = tune_tiles.large_t_variants(default_tiling(num_tokens, 8, 32, device_kind=device_kind), num_tokens)
  assert all(isinstance(tiles, MoETiling) for _, tiles, _, _ in variants)
print("variants ok")
"""


@pytest.mark.parametrize("device_kind", ["NVIDIA H200", "NVIDIA H100 80GB HBM3"])
def test_tune_tiles_variants_are_valid_tilings(device_kind, tmp_path):
  """Every variant of experiments/tune_tiles.py builds (a MoETiling that passes its checks) from each row's
  table entry: a variant that raises would stop the sweep on the GPU. (In a process of its own: the script's
  absl flags share names with benchmark.py's.)"""
  result = _run(["-c", _TUNE_VARIANTS_CHECK, device_kind], tmp_path)
  assert "variants ok" in result.stdout


def test_peer_table_recomputes_a_committed_comparison():
  """peer_table.py on session 13's benchmark beside the peer (one H200 call) gives the figures its README
  states: 1.397x pipelined, 1.365x kernel sum, the peer 1.495x, 15 of 21 rows faster; a missing peer row
  is an error."""
  from experiments import peer_table, tables
  results = REPO / "experiments" / "results" / "h200_2026-12-01_s13"
  ours = peer_table.timed_rows([results / "proj_uniform.jsonl", results / "proj_all_local.jsonl"])
  peer = tables.read_jsonl(results / "peer.jsonl")
  result = peer_table.compare(ours, peer)
  assert len(result["rows"]) == 21
  assert (round(result["geomean_pipelined"], 3), round(result["geomean_kernel_sum"], 3),
          round(result["geomean_peer"], 3)) == (1.397, 1.365, 1.495)
  assert len(result["faster"]) == 15 and ("uniform", 1) in result["faster"]
  assert {t for _, t, _ in result["slower"]} == {14, 15, 16, 32, 52, 55}
  t1 = next(x for x in result["rows"] if x["row"]["T"] == 1)
  groups = t1["groups"]
  assert groups["routing"] > 0 and groups["gemm1"] > groups["gemm2"] > groups["combine"] > 0
  # The groups add each kernel's median over the calls, kernel_sum_us is the median of the calls' sums: they
  # differ by the calls' spread (0.5 us at T=1).
  assert sum(groups.values()) == pytest.approx(t1["row"]["kernel_sum_us"], rel=0.02)
  assert "| 1 | uniform |" in tables.markdown_table(peer_table.HEADER, [peer_table.table_cells(t1)])
  with pytest.raises(ValueError, match="the peer file has no row"):
    peer_table.compare(ours, [p for p in peer if p.get("T") != 80])
