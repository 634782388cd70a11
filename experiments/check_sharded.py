r"""Correctness of the expert-parallel layer on real devices: every strategy against one device.

  # two GPUs (NCCL; NVLink SHARP multicast off):
  NCCL_NVLS_ENABLE=0 PYTHONPATH=. python3 experiments/check_sharded.py
  # CPU smoke run (8 simulated devices; ragged_all_to_all is reported as unsupported there):
  PYTHONPATH=. python3 experiments/check_sharded.py --cpu_devices=8 --shapes=small

For each shape (SMALL: E=32; DeepSeek-V3: E=256, H=7168, I=2048, top-8, so 128 experts per GPU on two),
token count and routing scenario, the script draws one input set over all E experts (weights generated on
device 0, then laid out over the 'expert' mesh axis), computes the single-device layer
(`moe_layer_all_experts`: the float32 sum of the P single-rank partials, rounded to bf16 once) with the same
implementation, and runs `moe_layer_sharded` with each strategy. Columns:

  vs 1-dev    matched ratio / rel-L2 / max |diff| against the single-device layer of the same implementation
              (the sharded layer must reproduce it up to float32 summation order)
  SPEC vs xla SPEC.md's acceptance criterion against the xla single-device layer at highest matmul
              precision (the reference path); PASS needs >= 90 % matched and no NaN/Inf
  dispatch    all_to_all: bucket capacity C, the fullest bucket, and whether the call fell back to all_gather
  ms          host-clock median of --iters calls (rough; timing studies are experiments/benchmark.py's job)

Memory at the full shape: all 256 experts' FP8 weights are 7.5 GB on device 0 (plus 3.75 GB per device for
the sharded copy); the single-device layers run 128 experts per `apply_local_experts` call, and the xla path
dequantizes one expert at a time, so no more than one expert is ever held in float32.
Exit status 1 if any row fails.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback

from absl import app, flags

from experiments import tables
from experiments.tables import markdown_table

_SHAPES = flags.DEFINE_list("shapes", ["small", "deepseek_v3"], "Geometries: small (E=32), deepseek_v3 (E=256).")
_SMALL_T = flags.DEFINE_list("small_T", ["16", "256"], "Token counts at the small shape.")
_FULL_T = flags.DEFINE_list("full_T", ["16", "512"], "Token counts at the DeepSeek-V3 shape.")
_SCENARIOS = flags.DEFINE_list("scenarios", ["uniform", "skewed"], "Routing scenarios (moe_pallas.testing).")
_STRATEGIES = flags.DEFINE_list("strategies", ["all_gather", "all_to_all", "ragged_all_to_all"], "Strategies.")
_IMPLEMENTATION = flags.DEFINE_string("implementation", "", "xla, triton, or '' for the best available.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Expert-axis size (0: all devices).")
_CAPACITY_FACTOR = flags.DEFINE_float("capacity_factor", None, "all_to_all bucket capacity factor (None: default).")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed calls per row (host clock).")
_SEED = flags.DEFINE_integer("seed", 0, "Base seed of the input draws.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "If > 0: run on this many simulated CPU devices.")
_OUT = flags.DEFINE_string("out", "", "Optional JSONL file for the rows.")

FACTOR = 2.5
REL_L2_VS_SINGLE_DEVICE = 1e-3  # float32 summation order and a rare bf16 last-bit flip, nothing more


def main(argv):
  del argv
  if _CPU_DEVICES.value:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}")
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from moe_pallas import DEEPSEEK_V3, SMALL, moe_layer_all_experts, moe_layer_sharded, testing
  from moe_pallas.layer import resolve_implementation

  devices = jax.devices()
  num_shards = _NUM_SHARDS.value or len(devices)
  platform = devices[0].platform
  implementation = resolve_implementation(_IMPLEMENTATION.value or None, interpret=False)
  mesh = jax.make_mesh((num_shards,), ("expert",), devices=devices[:num_shards])
  print(f"jax {jax.__version__}, {num_shards} x {devices[0].device_kind} ({platform}), "
        f"implementation={implementation}, NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}", flush=True)

  rows = []
  failed = False
  for shape in _SHAPES.value:
    base = {"small": SMALL, "deepseek_v3": DEEPSEEK_V3}[shape]
    config = base.with_local_experts(base.num_experts)
    if config.num_experts % num_shards:
      raise ValueError(f"{num_shards} shards do not divide E={config.num_experts}")
    experts_per_shard = config.num_experts // num_shards
    with jax.default_device(devices[0]):
      weights = testing.random_weights(config, seed=_SEED.value)
    sharded_weights = tuple(jax.device_put(w, NamedSharding(mesh, PartitionSpec("expert"))) for w in weights)
    jax.block_until_ready(sharded_weights)
    print(f"\n{shape}: E={config.num_experts} ({experts_per_shard} per shard), H={config.hidden}, "
          f"I={config.intermediate}, top_k={config.top_k}; weights "
          f"{sum(w.nbytes for w in weights) / 2**30:.2f} GiB in total", flush=True)

    token_counts = [int(t) for t in (_SMALL_T.value if shape == "small" else _FULL_T.value)]
    for num_tokens in token_counts:
      for scenario in _SCENARIOS.value:
        with jax.default_device(devices[0]):
          activations = testing.random_activations(config, num_tokens, seed=_SEED.value + num_tokens,
                                                   scenario=scenario)
        inputs = tuple(activations) + tuple(weights)
        single = moe_layer_all_experts(*inputs, routed_scaling_factor=FACTOR, config=config,
                                       experts_per_call=experts_per_shard, implementation=implementation)
        with jax.default_matmul_precision("highest"):
          xla = moe_layer_all_experts(*inputs, routed_scaling_factor=FACTOR, config=config,
                                      experts_per_call=experts_per_shard, implementation="xla")
        single = np.asarray(single.astype(jnp.float32))
        xla = np.asarray(xla.astype(jnp.float32))
        single_spec = testing.acceptance_metrics(single, xla)
        print(f"  T={num_tokens} {scenario}: single-device {implementation} vs xla: "
              f"matched={single_spec['matched_ratio']:.4f} rel_l2={single_spec['rel_l2']:.2e}", flush=True)

        for strategy in _STRATEGIES.value:
          row = dict(shape=shape, T=num_tokens, scenario=scenario, strategy=strategy, shards=num_shards,
                     implementation=implementation)
          if strategy == "ragged_all_to_all" and platform == "cpu":
            row.update(status="unsupported on CPU")
            rows.append(row)
            continue
          kwargs = {}
          if strategy == "all_to_all" and _CAPACITY_FACTOR.value is not None:
            kwargs["capacity_factor"] = _CAPACITY_FACTOR.value
          try:
            def call():
              return moe_layer_sharded(*activations, *sharded_weights, mesh=mesh, routed_scaling_factor=FACTOR,
                                       config=config, strategy=strategy, implementation=implementation,
                                       return_stats=True, **kwargs)
            out, stats = jax.block_until_ready(call())
            times = []
            for _ in range(_ITERS.value):
              start = time.perf_counter()
              jax.block_until_ready(call())
              times.append((time.perf_counter() - start) * 1e3)
            out = np.asarray(out.astype(jnp.float32))
            vs_single = testing.acceptance_metrics(out, single)
            spec = testing.acceptance_metrics(out, xla)
            ok = (vs_single["passed"] and vs_single["rel_l2"] <= REL_L2_VS_SINGLE_DEVICE and spec["passed"])
            row.update(status="ok" if ok else "FAIL", vs_single=vs_single,
                       max_abs_diff=float(np.max(np.abs(out - single))) if out.size else 0.0, spec_vs_xla=spec,
                       fell_back=bool(stats.fell_back), capacity=int(stats.capacity),
                       max_bucket_tokens=int(stats.max_bucket_tokens),
                       ms=statistics.median(times) if times else None)
          except Exception as e:  # one broken strategy must not hide the others' rows
            traceback.print_exc()
            row.update(status=f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:120]}")
          failed |= row["status"] not in ("ok", "unsupported on CPU")
          rows.append(row)
          print("    " + _format(row), flush=True)

  print("\n" + _table(rows))
  if _OUT.value:
    tables.write_jsonl(_OUT.value, rows)
  sys.exit(1 if failed else 0)


_HEADER = ("shape", "T", "scenario", "strategy", "vs 1-dev matched", "rel_l2", "max|diff|", "SPEC vs xla",
           "dispatch", "ms", "status")


def _cells(row):
  if "vs_single" not in row:
    return (row["shape"], str(row["T"]), row["scenario"], row["strategy"], "", "", "", "", "", "", row["status"])
  vs, spec = row["vs_single"], row["spec_vs_xla"]
  dispatch = ""
  if row["strategy"] == "all_to_all":
    dispatch = f"C={row['capacity']} max={row['max_bucket_tokens']}" + (" FELL BACK" if row["fell_back"] else "")
  return (row["shape"], str(row["T"]), row["scenario"], row["strategy"], f"{vs['matched_ratio']:.4f}",
          f"{vs['rel_l2']:.1e}", f"{row['max_abs_diff']:.3g}",
          f"{'PASS' if spec['passed'] else 'FAIL'} {spec['matched_ratio']:.4f} / {spec['rel_l2']:.1e}", dispatch,
          f"{row['ms']:.2f}" if row.get("ms") is not None else "", row["status"])


def _format(row):
  return " | ".join(_cells(row))


def _table(rows):
  return markdown_table(_HEADER, (_cells(row) for row in rows))


if __name__ == "__main__":
  app.run(main)
