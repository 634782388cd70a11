"""Determinism, memory and compiles of the layer on one device (issue 9).

For the full DeepSeek-V3 shape on a GPU (the default there) or the SMALL shape with --smoke (CPU CI):
  * determinism: at a few T, the output's SHA-256 across two calls of one program and across a recompile
    (jax.clear_caches) must be identical;
  * memory: at each --memory_T (all_local routing, the compute worst case), the compiled program's
    memory_analysis (temp, output, argument bytes) and, where the device reports it, memory_stats'
    peak_bytes_in_use minus the bytes in use once the weights are resident ("beyond the weights"); an
    out-of-memory is recorded, not raised;
  * compile time per new T (lower + compile of the jitted layer);
  * recompiles over a sweep of T: one per distinct T plainly, one per bucket with moe_pallas.moe_layer_bucketed.
Writes <out>/reliability.jsonl (one record per measurement) and <out>/reliability.md (a summary table).

  PYTHONPATH=. python3 -m experiments.reliability_check --out experiments/results/reliability_h200   # GPU
  PYTHONPATH=. python3 -m experiments.reliability_check --smoke --out /tmp/reliability                 # CPU
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

import moe_pallas as mp
from moe_pallas import layer, testing

_OUT = flags.DEFINE_string("out", "experiments/results/reliability", "Output directory.")
_SMOKE = flags.DEFINE_bool("smoke", False, "SMALL shape, small T, xla: a CPU check that the script runs.")
_IMPLEMENTATION = flags.DEFINE_enum("implementation", None, ["xla", "triton"], "Default: the best available.")
_DETERMINISM_T = flags.DEFINE_list("determinism_T", None, "T values for the determinism check.")
_MEMORY_T = flags.DEFINE_list("memory_T", None, "T values (all_local) for memory; default 14107,32768,65536.")
_SWEEP = flags.DEFINE_integer("sweep_count", None, "How many T values the recompile sweep draws.")
_SWEEP_MAX = flags.DEFINE_integer("sweep_max_T", None, "Largest T of the recompile sweep.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the input draws.")

FACTOR = 2.5


def _digest(x) -> str:
  return hashlib.sha256(np.asarray(x).view(np.uint16).tobytes()).hexdigest()


def _offset(config) -> int:
  return 32 if config.num_experts == 256 else 8


def _call(config, inputs, offset, implementation):
  return mp.moe_layer(*inputs, local_expert_offset=offset, routed_scaling_factor=FACTOR, config=config,
                      implementation=implementation)


def _memory_stats():
  stats = jax.devices()[0].memory_stats()
  return stats or {}


def determinism(config, weights, sizes, implementation, seed):
  records = []
  offset = _offset(config)
  for t in sizes:
    acts = testing.random_activations(config, t, seed=seed + t, scenario="skewed", local_expert_offset=offset)
    inputs = (*acts, *weights)
    first = _digest(_call(config, inputs, offset, implementation))
    second = _digest(_call(config, inputs, offset, implementation))
    jax.clear_caches()
    recompiled = _digest(_call(config, inputs, offset, implementation))
    records.append(dict(kind="determinism", T=t, sha256=first, same_program_identical=first == second,
                        recompile_identical=first == recompiled))
  return records


def memory_and_compile(config, weights, sizes, implementation, seed, weights_bytes_in_use):
  records = []
  offset = _offset(config)
  fn = jax.jit(lambda *x: _call(config, x, offset, implementation))
  for t in sizes:
    record = dict(kind="memory", T=t, scenario="all_local")
    try:
      acts = testing.random_activations(config, t, seed=seed + t, scenario="all_local", local_expert_offset=offset)
      inputs = (*acts, *weights)
      start = time.perf_counter()
      compiled = fn.lower(*inputs).compile()
      record["compile_s"] = round(time.perf_counter() - start, 3)
      analysis = compiled.memory_analysis()
      if analysis is not None:
        for name in ("temp_size_in_bytes", "output_size_in_bytes", "argument_size_in_bytes"):
          record[name] = int(getattr(analysis, name, -1))
      out = compiled(*inputs)
      out.block_until_ready()
      record["finite"] = bool(np.isfinite(np.asarray(out, np.float32)).all())
      stats = _memory_stats()
      if "peak_bytes_in_use" in stats and weights_bytes_in_use is not None:
        record["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
        record["peak_beyond_weights_bytes"] = int(stats["peak_bytes_in_use"]) - weights_bytes_in_use
      record["oom"] = False
      del out, compiled, inputs, acts
    except Exception as e:  # an out-of-memory is a result here, not a crash
      record["oom"] = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
      record["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    records.append(record)
    print(json.dumps(record), flush=True)
  return records


def recompile_sweep(config, weights, count, max_t, implementation, seed):
  offset = _offset(config)
  rng = np.random.default_rng(seed)
  sizes = sorted(set(int(t) for t in rng.integers(1, max_t + 1, size=count)))
  program = layer._moe_layer_program
  jax.clear_caches()
  before = program._cache_size()
  start = time.perf_counter()
  for t in sizes:
    acts = testing.random_activations(config, t, seed=seed + t, local_expert_offset=offset)
    out = mp.moe_layer_bucketed(*acts, *weights, local_expert_offset=offset, routed_scaling_factor=FACTOR,
                                config=config, implementation=implementation)
    out.block_until_ready()
  return dict(kind="recompiles", sweep_T=sizes, distinct_T=len(sizes),
              buckets=sorted({mp.bucket_tokens(t) for t in sizes}),
              bucketed_compiles=program._cache_size() - before, seconds=round(time.perf_counter() - start, 2))


def _markdown(header, records) -> str:
  lines = [f"# Reliability check: {header}", "", "## Determinism", "", "| T | same program | after recompile |",
           "|---|---|---|"]
  lines += [f"| {r['T']} | {r['same_program_identical']} | {r['recompile_identical']} |"
            for r in records if r["kind"] == "determinism"]
  lines += ["", "## Memory (all_local) and compile time", "",
            "| T | compile s | temp MB | output MB | peak beyond weights MB | OOM |", "|---|---|---|---|---|---|"]
  mb = lambda r, k: f"{r[k] / 2**20:.1f}" if k in r and r[k] >= 0 else "n/a"  # noqa: E731
  lines += [f"| {r['T']} | {r.get('compile_s', 'n/a')} | {mb(r, 'temp_size_in_bytes')} | "
            f"{mb(r, 'output_size_in_bytes')} | {mb(r, 'peak_beyond_weights_bytes')} | {r['oom']} |"
            for r in records if r["kind"] == "memory"]
  for r in records:
    if r["kind"] == "recompiles":
      lines += ["", "## Recompiles over a sweep of T", "",
                f"{r['distinct_T']} distinct T in [1, {max(r['sweep_T'])}]: {r['distinct_T']} programs unpadded, "
                f"{r['bucketed_compiles']} with moe_layer_bucketed (buckets {r['buckets']}), {r['seconds']} s."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  smoke = _SMOKE.value
  config = mp.SMALL if smoke else mp.DEEPSEEK_V3
  implementation = _IMPLEMENTATION.value or ("xla" if smoke else None)
  det_t = [int(t) for t in (_DETERMINISM_T.value or (["1", "37", "300"] if smoke else ["1", "901", "14107"]))]
  mem_t = [int(t) for t in (_MEMORY_T.value or (["64", "512"] if smoke else ["14107", "32768", "65536"]))]
  sweep_count = _SWEEP.value or (12 if smoke else 40)
  sweep_max = _SWEEP_MAX.value or (100 if smoke else 2048)
  os.makedirs(_OUT.value, exist_ok=True)

  device = jax.devices()[0]
  header = dict(kind="header", device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                shape="SMALL" if smoke else "DEEPSEEK_V3", implementation=implementation or "best available",
                resolved=mp.layer.resolve_implementation(implementation, interpret=False))
  print(json.dumps(header), flush=True)
  weights = tuple(jax.device_put(w) for w in testing.random_weights(config, seed=_SEED.value))
  jax.block_until_ready(weights)
  weights_bytes = sum(int(w.nbytes) for w in weights)
  in_use = _memory_stats().get("bytes_in_use")
  header.update(weights_bytes=weights_bytes, bytes_in_use_with_weights=in_use)

  records = [header]
  records += determinism(config, weights, det_t, implementation, _SEED.value)
  records += memory_and_compile(config, weights, sorted(mem_t), implementation, _SEED.value, in_use)
  records.append(recompile_sweep(config, weights, sweep_count, sweep_max, implementation, _SEED.value))
  with open(os.path.join(_OUT.value, "reliability.jsonl"), "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  title = f"{header['device']} ({header['backend']}), {header['shape']}, {header['resolved']}, jax {jax.__version__}"
  with open(os.path.join(_OUT.value, "reliability.md"), "w") as f:
    f.write(_markdown(title, records))
  print(_markdown(title, records))
  bad = [r for r in records if r["kind"] == "determinism" and not (r["same_program_identical"]
                                                                    and r["recompile_identical"])]
  bad += [r for r in records if r["kind"] == "memory" and (r["oom"] or "error" in r)]
  if bad:
    raise SystemExit(f"reliability check failed: {bad}")


if __name__ == "__main__":
  app.run(main)
