r"""What expert parallelism costs: `moe_layer_sharded`'s three dispatch strategies against one rank alone.

  # two H200s (one process, both GPUs; NCCL with NVLink SHARP multicast off), about 4-6 minutes:
  NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/sharded_benchmark.py \
      --out=experiments/results/h200x2_dispatch.jsonl
  # CPU smoke run (small shape, 2 or 8 simulated devices, host clock; ragged_all_to_all is unsupported there):
  XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=. python3 experiments/sharded_benchmark.py --smoke

The layer: all E experts (DeepSeek-V3: 256, H=7168, I=2048, top-8) over an 'expert' mesh of the P devices
(two GPUs: 128 experts each), T tokens per device (P*T in all), uniform and skewed routing. For each
(T, scenario) and strategy, one row:

  step_us          per step, pipelined: `jax.jit(moe_layer_sharded)` called --iters times back to back (no wait
                   between calls), one block at the end, per call = wall / iters, median of --rounds rounds.
                   The timer is experiments/timing.py's `time_pipelined` (as benchmark.py's pipelined mode): a
                   chained L2 flush runs before every call and the flush-only loop is subtracted. Should that
                   function be missing or fail, a local timer without a flush runs instead
                   (`_time_pipelined_local`). The weights touched per step (>= 16 experts x 44 MB at T = 1) are
                   far larger than the 50 MB L2, so the flush changes little here. `timer` names the one used.
  single_rank_us   one device running one rank's share alone: `moe_layer` (the single-rank layer, E/P local
                   experts at offset p*E/P) on all P*T tokens with the same routing, timed the same way on
                   device p with the other devices idle; the max over ranks (the step waits for the slowest
                   rank), per rank in `single_rank_us_per_rank`. step_us - single_rank_us
                   (`dispatch_combine_us`) is what dispatch and combine cost (plus each rank's routing of its
                   own T tokens, which the single-rank layer does for all P*T).
  bytes_per_token  bytes a token moves between devices in this call (out and back, summed over the P
                   shards' sends, divided by the P*T tokens), from the runtime send sizes: the per-(source,
                   destination) token counts S[s, d] that the layer's own bookkeeping (`sharding.bucket_slots`
                   on the routing) computes for the collectives, times the row sizes (a token row of
                   H + 4H/128 + 8 top_k bytes out, a float32 result row of 4H back). all_gather: every row to
                   every peer; all_to_all: the fixed buckets of C rows, padding included (all_gather's bytes
                   when the call fell back); ragged_all_to_all: sum over s != d of S[s, d]. Not counted: the
                   scalar pmax of the bucket fill (every strategy) and ragged's P x P int32 count exchange.
  bytes_per_token_bound     what the compiled buffers allow (capacity-sized): all_gather and all_to_all as
                   above (their buffers are always full); ragged: min(P - 1, D) destinations per token (the
                   buffers are sized for the worst case; D = the most shards a token's picks can reach).
  bytes_per_token_readme    README's formula for the strategy (for ragged, its stated bound).
  passed, rel_l2   SPEC.md's acceptance criterion of the sharded output against the single-device computation
                   (`moe_layer_all_experts` with experts_per_call = E/P and the same implementation, on
                   device 0 with a copy of all E experts), with the relative L2 error, matched ratio and
                   max |diff|; `exact` marks rel_l2 <= 1e-3 (float32 summation order and a rare last-bit
                   flip are all the sharded layer may add). --xla_check adds SPEC's criterion against the xla
                   single-device layer at highest matmul precision (slow at T = 4096).

Inputs: the weights of shard p are drawn on device p (`testing.random_weights` with E/P experts and seed
--seed*1000 + p), so no device holds all E experts until device 0 copies them for the reference. Activations
are drawn for all P*T tokens with one seed per (T, scenario) (`testing.random_activations`); "skewed" boosts
the two hottest-bias experts of shard 0 (local_expert_offset 0), so shard 0 serves nearly every token:
both load imbalance and maximal traffic toward one shard. Rows go to --out (JSONL) as they finish, and a
Markdown table next to it (same name, .md). Exit status 1 if any row that ran fails or errors.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import statistics
import sys
import time
import traceback

from absl import app, flags

from experiments.tables import markdown_table

_SHAPE = flags.DEFINE_enum("shape", "deepseek_v3", ["deepseek_v3", "small"],
                           "deepseek_v3: E=256, H=7168, I=2048, top-8; small: E=32, H=256, I=128, top-4.")
_T = flags.DEFINE_list("T", ["1", "16", "80", "901", "4096"], "Tokens per device (P*T tokens in all).")
_SCENARIOS = flags.DEFINE_list("scenarios", ["uniform", "skewed"], "Routing scenarios: uniform, skewed.")
_STRATEGIES = flags.DEFINE_list("strategies", ["all"],
                                "all, or a list of all_gather, all_to_all, ragged_all_to_all.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Expert-axis size P (0: every device).")
_IMPLEMENTATION = flags.DEFINE_string("implementation", "", "xla, triton, or '' for the best available.")
_CAPACITY_FACTOR = flags.DEFINE_float("capacity_factor", None, "all_to_all bucket capacity factor (None: 1.25).")
_ITERS = flags.DEFINE_integer("iters", 30, "Steps per timed round (enqueued back to back).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds; the median is reported.")
_MAX_ROW_SECONDS = flags.DEFINE_float("max_row_seconds", 4.0,
                                      "Fewer iters per round when iters x rounds steps would take longer.")
_SEED = flags.DEFINE_integer("seed", 0, "Base seed of the weights and activations.")
_XLA_CHECK = flags.DEFINE_bool("xla_check", False, "Also check SPEC's criterion against the xla layer.")
_SMOKE = flags.DEFINE_bool("smoke", False, "CPU smoke run: small shape, CPU platform, T=1,13, 3 iters x 2 rounds "
                           "(unless those flags are given). Devices: XLA_FLAGS or --cpu_devices.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "If > 0: force this many simulated CPU devices.")
_OUT = flags.DEFINE_string("out", "", "JSONL file for the rows (a Markdown table goes next to it as .md).")

FACTOR = 2.5
EXACT_REL_L2 = 1e-3
STRATEGIES = ("all_gather", "all_to_all", "ragged_all_to_all")


def _time_pipelined_local(fn, args, *, iters: int, rounds: int) -> dict:
  """Pipelined per-step time without an L2 flush (used when experiments/timing.py has no time_pipelined).

  `fn(*args)` is enqueued `iters` times back to back (JAX dispatch is asynchronous, so the host runs ahead of
  the devices as a model's step loop does), then one block_until_ready on the last output; per step = wall
  time / iters. Each device runs its programs in order, so the last output being ready means every step ran.
  Median over `rounds` rounds, after a compile call and 2 warm-up steps.
  """
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first_call_s = time.perf_counter() - t0
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  per_step = []
  for _ in range(rounds):
    out = None
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    per_step.append((time.perf_counter() - start) / iters * 1e6)
  return dict(pipelined_us=statistics.median(per_step), pipelined_min_us=min(per_step),
              pipelined_max_us=max(per_step), pipelined_rounds_us=per_step, pipelined_iters=iters,
              pipelined_rounds=rounds, pipelined_first_call_s=first_call_s,
              pipelined_method="local: back-to-back calls, one block at the end, no L2 flush, wall / iters")


def _timer():
  """experiments/timing.py's time_pipelined when it exists, else the local one."""
  try:
    from experiments import timing
    if hasattr(timing, "time_pipelined"):
      return "timing.time_pipelined", timing
  except Exception:  # noqa: BLE001  (an import problem there must not stop this benchmark)
    traceback.print_exc()
  return "local", None


def _time(fn, args, *, platform):
  """Pipelined per-step time of fn(*args) in µs, with --iters reduced to stay within --max_row_seconds."""
  name, timing = _timer()
  iters, rounds = _ITERS.value, _ROUNDS.value
  # One untimed step (compile included), then a rough step time to size the rounds.
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  rough_s = time.perf_counter() - start
  iters = max(2, min(iters, int(_MAX_ROW_SECONDS.value / max(rough_s * rounds, 1e-9))))
  if timing is not None:
    try:
      flush_bytes = timing.DEFAULT_FLUSH_BYTES if platform == "gpu" else 2**20
      result = timing.time_pipelined(fn, args, iters=iters, rounds=rounds, flush_bytes=flush_bytes)
      result["pipelined_us"]  # noqa: B018  (the one key this script cannot do without)
      result.update(timer=name)
      return result
    except Exception as e:  # noqa: BLE001  (an interface change there: fall back, and say so in the row)
      traceback.print_exc()
      name = f"local (timing.time_pipelined failed: {type(e).__name__})"
  result = _time_pipelined_local(fn, args, iters=iters, rounds=rounds)
  result.update(timer=name)
  return result


def _wire_bytes(topk_ids, *, config, num_shards, tokens_per_shard, strategy, capacity, fell_back):
  """Bytes per token of one call from the runtime send sizes; also the buffer bound and README's formula."""
  experts_per_shard = config.num_experts // num_shards
  row_bytes = config.hidden + 4 * (config.hidden // config.block) + 8 * config.top_k
  result_bytes = 4 * config.hidden
  both = row_bytes + result_bytes
  peers = num_shards - 1
  counts = np.zeros((num_shards, num_shards), np.int64)  # S[s, d]: tokens shard s sends to shard d
  for s in range(num_shards):
    ids = jnp.asarray(topk_ids[s * tokens_per_shard:(s + 1) * tokens_per_shard])
    _, _, bucket_tokens = sharding.bucket_slots(ids, num_shards=num_shards, experts_per_shard=experts_per_shard)
    counts[s] = np.asarray(bucket_tokens)
  remote_rows = int(counts.sum() - np.trace(counts))
  destinations = sharding.max_destinations_per_token(config, num_shards)
  all_gather = peers * both
  buckets = peers * capacity / tokens_per_shard * both
  if strategy == "all_gather":
    measured, bound, readme = all_gather, all_gather, all_gather
  elif strategy == "all_to_all":
    measured = all_gather if fell_back else buckets
    bound, readme = measured, buckets
  else:
    measured = remote_rows * both / (num_shards * tokens_per_shard)
    bound = readme = min(peers, destinations) * both
  return dict(bytes_per_token=float(measured), bytes_per_token_bound=float(bound),
              bytes_per_token_readme=float(readme), remote_token_rows=remote_rows,
              max_bucket_tokens_host=int(counts.max()), send_counts=counts.tolist(), row_bytes=row_bytes,
              result_row_bytes=result_bytes)


def main(argv):
  del argv
  global jax, jnp, np, sharding
  if _SMOKE.value:
    os.environ["JAX_PLATFORMS"] = "cpu"
    for name, value in (("shape", "small"), ("T", ["1", "13"]), ("iters", 3), ("rounds", 2)):
      if not flags.FLAGS[name].present:
        flags.FLAGS[name].value = value
  if _CPU_DEVICES.value:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from moe_pallas import DEEPSEEK_V3, SMALL, moe_layer_all_experts, sharding, testing
  from moe_pallas.layer import moe_layer, resolve_implementation
  from moe_pallas.routing import route

  strategies = list(STRATEGIES) if _STRATEGIES.value == ["all"] else _STRATEGIES.value
  for s in strategies:
    if s not in STRATEGIES:
      raise app.UsageError(f"--strategies: unknown {s!r}; choose from {STRATEGIES} or all")
  devices = jax.devices()
  num_shards = _NUM_SHARDS.value or len(devices)
  if num_shards > len(devices):
    raise app.UsageError(f"--num_shards={num_shards} but only {len(devices)} devices")
  devices = devices[:num_shards]
  platform = devices[0].platform
  implementation = resolve_implementation(_IMPLEMENTATION.value or None, interpret=False)
  base = {"small": SMALL, "deepseek_v3": DEEPSEEK_V3}[_SHAPE.value]
  config = base.with_local_experts(base.num_experts)
  if config.num_experts % num_shards:
    raise app.UsageError(f"{num_shards} shards do not divide E={config.num_experts}")
  experts_per_shard = config.num_experts // num_shards
  shard_config = config.with_local_experts(experts_per_shard)
  device_name = f"{num_shards} x {devices[0].device_kind}"
  mesh = jax.make_mesh((num_shards,), ("expert",), devices=devices)
  timer_name = _timer()[0]
  run_start = time.perf_counter()
  print(f"jax {jax.__version__}, {device_name} ({platform}), implementation={implementation}, "
        f"timer={timer_name}, NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

  # Weights: shard p drawn on device p, then one global [E, ...] array split over 'expert'.
  start = time.perf_counter()
  pieces = []
  for p, device in enumerate(devices):
    with jax.default_device(device):
      pieces.append(jax.block_until_ready(testing.random_weights(shard_config, seed=_SEED.value * 1000 + p)))
  weights = tuple(
      jax.make_array_from_single_device_arrays(
          (config.num_experts,) + pieces[0][i].shape[1:], NamedSharding(mesh, PartitionSpec("expert")),
          [piece[i] for piece in pieces])
      for i in range(4))
  local_weights = pieces  # local_weights[p]: shard p's [E/P, ...] arrays on device p (no copy)
  # The single-device computation needs every expert on one device: a copy on device 0.
  # (Concatenated from the pieces: a device_put of the global arrays would keep their 'expert' sharding type.)
  with jax.default_device(devices[0]):
    full_weights = tuple(jnp.concatenate([jax.device_put(piece[i], devices[0]) for piece in pieces])
                         for i in range(4))
  jax.block_until_ready(full_weights)
  weights_note = (f"shard p drawn on device p: testing.random_weights(E/P={experts_per_shard} experts, "
                  f"seed={_SEED.value}*1000+p)")
  print(f"{_SHAPE.value}: E={config.num_experts} ({experts_per_shard} per shard), H={config.hidden}, "
        f"I={config.intermediate}, top_k={config.top_k}; weights {sum(w.nbytes for w in weights) / 2**30:.2f} GiB "
        f"drawn in {time.perf_counter() - start:.1f} s", flush=True)

  # The jitted programs, made once so that every (T, scenario) of one shape reuses their traces and compiles.
  rank_fns = [jax.jit(functools.partial(moe_layer, local_expert_offset=p * experts_per_shard,
                                        routed_scaling_factor=FACTOR, config=shard_config,
                                        implementation=implementation)) for p in range(num_shards)]
  steps = {}
  for strategy in strategies:
    kwargs = {}
    if strategy == "all_to_all" and _CAPACITY_FACTOR.value is not None:
      kwargs["capacity_factor"] = _CAPACITY_FACTOR.value
    steps[strategy] = jax.jit(functools.partial(
        sharding.moe_layer_sharded, mesh=mesh, routed_scaling_factor=FACTOR, config=config, strategy=strategy,
        implementation=implementation, return_stats=True, **kwargs))

  token_spec = PartitionSpec("expert")
  scale_spec = PartitionSpec(None, "expert")

  def global_array(x, spec):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

  rows, failed = [], False
  out_path = pathlib.Path(_OUT.value) if _OUT.value else None
  if out_path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("")

  def emit(row):
    rows.append(row)
    print("    " + " | ".join(_cells(row)), flush=True)
    if out_path:
      with out_path.open("a") as f:
        f.write(json.dumps(row) + "\n")

  for tokens_per_shard in (int(t) for t in _T.value):
    num_tokens = num_shards * tokens_per_shard
    for scenario in _SCENARIOS.value:
      case_start = time.perf_counter()
      seed = _SEED.value * 1000 + 7919 * tokens_per_shard + {"uniform": 1, "skewed": 2}.get(scenario, 3)
      with jax.default_device(devices[0]):
        activations = [np.asarray(a) for a in testing.random_activations(
            shard_config, num_tokens, seed=seed, scenario=scenario, local_expert_offset=0)]
      on_device0 = [jax.device_put(a, devices[0]) for a in activations]
      single = moe_layer_all_experts(*on_device0, *full_weights, routed_scaling_factor=FACTOR, config=config,
                                     experts_per_call=experts_per_shard, implementation=implementation)
      single = np.asarray(single.astype(jnp.float32))
      xla_ref = None
      if _XLA_CHECK.value:
        with jax.default_matmul_precision("highest"):
          xla_ref = moe_layer_all_experts(*on_device0, *full_weights, routed_scaling_factor=FACTOR,
                                          config=config, experts_per_call=experts_per_shard, implementation="xla")
        xla_ref = np.asarray(xla_ref.astype(jnp.float32))
      topk_ids, _ = route(on_device0[0], on_device0[1], config=config, routed_scaling_factor=FACTOR)
      topk_ids = np.asarray(topk_ids)
      owners = topk_ids // experts_per_shard
      local_pairs = [int((owners == p).sum()) for p in range(num_shards)]

      # One rank's share alone: the single-rank layer on all P*T tokens, on its own device.
      per_rank = []
      for p, device in enumerate(devices):
        rank_args = [jax.device_put(a, device) for a in activations] + list(local_weights[p])
        per_rank.append(_time(rank_fns[p], rank_args, platform=platform)["pipelined_us"])
        del rank_args
      single_rank_us = max(per_rank)
      print(f"  T={tokens_per_shard}/device ({num_tokens} in all) {scenario}: (token, expert) pairs per shard "
            f"{local_pairs}; one rank alone {', '.join(f'{t:.1f}' for t in per_rank)} µs", flush=True)

      sharded_args = [global_array(a, s) for a, s in zip(
          activations, (token_spec, PartitionSpec(), token_spec, scale_spec))] + list(weights)
      for strategy in strategies:
        row = dict(strategy=strategy, shards=num_shards, shape=_SHAPE.value, T=tokens_per_shard,
                   tokens_total=num_tokens, scenario=scenario, step_us=None, single_rank_us=single_rank_us,
                   single_rank_us_per_rank=per_rank, dispatch_combine_us=None, bytes_per_token=None,
                   passed=None, rel_l2=None, device=device_name, implementation=implementation,
                   pairs_per_shard=local_pairs, weights=weights_note, timer=timer_name,
                   xla_flags=os.environ.get("XLA_FLAGS", ""))
        if strategy == "ragged_all_to_all" and platform == "cpu":
          row.update(status="unsupported on CPU")
          emit(row)
          continue
        step = steps[strategy]
        try:
          out, stats = jax.block_until_ready(step(*sharded_args))
          out = np.asarray(out.astype(jnp.float32))
          metrics = testing.acceptance_metrics(out, single)
          timed = _time(step, sharded_args, platform=platform)
          fell_back = bool(stats.fell_back)
          wire = _wire_bytes(topk_ids, config=config, num_shards=num_shards, tokens_per_shard=tokens_per_shard,
                             strategy=strategy, capacity=int(stats.capacity), fell_back=fell_back)
          row.update(step_us=timed["pipelined_us"], dispatch_combine_us=timed["pipelined_us"] - single_rank_us,
                     step_us_rounds=timed.get("pipelined_rounds_us"), iters=timed.get("pipelined_iters"),
                     rounds=timed.get("pipelined_rounds"), timer=timed["timer"],
                     timer_method=timed.get("pipelined_method"),
                     passed=metrics["passed"], rel_l2=metrics["rel_l2"], matched_ratio=metrics["matched_ratio"],
                     max_abs_diff=float(np.max(np.abs(out - single))) if out.size else 0.0,
                     exact=metrics["passed"] and metrics["rel_l2"] <= EXACT_REL_L2, fell_back=fell_back,
                     capacity=int(stats.capacity), max_bucket_tokens=int(stats.max_bucket_tokens), **wire)
          if xla_ref is not None:
            spec = testing.acceptance_metrics(out, xla_ref)
            row.update(spec_vs_xla_passed=spec["passed"], spec_vs_xla_rel_l2=spec["rel_l2"],
                       spec_vs_xla_matched=spec["matched_ratio"])
            row["passed"] = row["passed"] and spec["passed"]
          if wire["max_bucket_tokens_host"] != row["max_bucket_tokens"]:
            row["note"] = "host send counts disagree with the layer's DispatchStats.max_bucket_tokens"
            row["passed"] = False
          row["status"] = "ok" if row["passed"] else "FAIL"
        except Exception as e:  # noqa: BLE001  (one broken strategy must not hide the other rows)
          traceback.print_exc()
          row.update(status=f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:160]}", passed=False)
        failed |= row["status"] != "ok"
        emit(row)
      del sharded_args
      print(f"  ({time.perf_counter() - case_start:.1f} s)", flush=True)

  table = _table(rows)
  print("\n" + table)
  print(f"\ntotal {time.perf_counter() - run_start:.1f} s; {'FAILED rows' if failed else 'every row passed'}")
  if out_path:
    header = (f"# moe_layer_sharded: dispatch strategies vs one rank alone ({device_name}, {_SHAPE.value}, "
              f"implementation={implementation})\n\nTimer: {timer_name} (pipelined, per step, median of "
              f"{_ROUNDS.value} rounds). Weights: {weights_note}. T is tokens per device. "
              "dispatch+combine = step - single rank (the slowest rank alone). Bytes per token from the runtime "
              "send sizes; the bound is what the compiled buffers allow; README is its formula. Pass: SPEC.md's "
              "criterion vs the single-device computation.\n\n")
    out_path.with_suffix(".md").write_text(header + table + "\n")
  sys.exit(1 if failed else 0)


_HEADER = ("T/device", "scenario", "strategy", "step µs", "single rank µs", "dispatch+combine µs",
           "bytes/token (bound; README)", "pass / rel_l2", "dispatch", "status")


def _cells(row):
  def us(x):
    return "" if x is None else f"{x:.1f}"
  if row.get("bytes_per_token") is None:
    wire = ""
  else:
    wire = (f"{row['bytes_per_token']:,.0f} ({row['bytes_per_token_bound']:,.0f}; "
            f"{row['bytes_per_token_readme']:,.0f})")
  check = "" if row.get("rel_l2") is None else f"{'PASS' if row['passed'] else 'FAIL'} / {row['rel_l2']:.1e}"
  dispatch = ""
  if row["strategy"] == "all_to_all" and row.get("capacity") is not None:
    dispatch = f"C={row['capacity']} max={row['max_bucket_tokens']}" + (" FELL BACK" if row["fell_back"] else "")
  return (str(row["T"]), row["scenario"], row["strategy"], us(row.get("step_us")), us(row.get("single_rank_us")),
          us(row.get("dispatch_combine_us")), wire, check, dispatch, row["status"])


def _table(rows):
  return markdown_table(_HEADER, (_cells(row) for row in rows))


if __name__ == "__main__":
  app.run(main)
