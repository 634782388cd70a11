"""Kernel bring-up on the GPU: wgmma in the compiled kernels, correctness at full shape, rough times.

  PYTHONPATH=. python3 experiments/check_kernels.py --dump_dir=/tmp/xla_dump

For each T (uniform routing, plus all_local rows) it checks implementation="triton" against the xla path
(float32, on device) under SPEC.md's criterion, and prints host-clock times of both (median of --iters
calls, each after an L2 flush; host clocks include launch overhead: the benchmark harness gives GPU spans).
With --dump_dir it dumps XLA's compiled PTX and reports whether the Pallas kernels use wgmma.
"""

from __future__ import annotations

import glob
import os
import statistics
import sys
import time

from absl import app, flags

_T = flags.DEFINE_list("T", ["1", "7", "16", "32", "80", "901", "14107"], "Token counts (uniform routing).")
_ALL_LOCAL = flags.DEFINE_list("all_local_T", ["901", "14107"], "Token counts with all_local routing.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per row.")
_DUMP = flags.DEFINE_string("dump_dir", "", "If set, dump XLA's PTX here and grep it for wgmma / mma.sync.")
_TILINGS = flags.DEFINE_bool("tilings", False, "Also time a few tile variants at each T.")


def main(argv):
  del argv
  if _DUMP.value:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={_DUMP.value}")
  import jax
  import jax.numpy as jnp
  import numpy as np

  import moe_pallas as mp
  from moe_pallas.kernels import grouped_moe, tiling as tiling_lib

  config = mp.DEEPSEEK_V3
  device = jax.devices()[0]
  print(f"device: {device.device_kind}, jax {jax.__version__}", flush=True)
  L, H, I, E = config.num_local_experts, config.hidden, config.intermediate, config.num_experts

  def fp8(key, shape):
    return jnp.clip(jax.random.normal(key, shape, jnp.float32), -2, 2).astype(jnp.float8_e4m3fn)

  keys = jax.random.split(jax.random.key(0), 4)
  weights = (fp8(keys[0], (L, 2 * I, H)), jax.random.normal(keys[1], (L, 2 * I // 128, H // 128)),
             fp8(keys[2], (L, H, I)), jax.random.normal(keys[3], (L, H // 128, I // 128)))
  flush = jnp.zeros((64 * 2**20,), jnp.float32)
  flush_fn = jax.jit(lambda x: x + 1.0)

  def activations(T, seed, offset, all_local):
    k = jax.random.split(jax.random.key(seed), 4)
    logits = jax.random.normal(k[0], (T, E), jnp.float32)
    if all_local:
      logits = logits.at[:, offset:offset + L].add(4.0)
    bias = (0.1 * jax.random.normal(k[1], (E,))).astype(jnp.bfloat16)
    return (logits, bias, fp8(k[2], (T, H)), jax.random.normal(k[3], (H // 128, T)))

  sys.path.insert(0, os.path.dirname(__file__))
  from timing import GpuTimer  # the benchmark harness's GPU-span timer
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
      r = np.asarray(ref, np.float64)
      o = np.asarray(out, np.float64)
      diff = np.abs(o - r)
      matched = float(np.mean((diff <= 1) | (diff / (np.abs(r) + 1e-8) <= 0.3)))
      rel = float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))
      finite = bool(np.isfinite(o).all())
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
  if _DUMP.value:
    # XLA compiles the Pallas-Triton custom calls itself; whichever dumped file holds their PTX/LLVM
    # is searched for the tensor-core instructions.
    counts = {"wgmma.mma_async": 0, "mma.sync": 0, "llvm.nvvm.wgmma": 0}
    holders = set()
    for path in glob.glob(os.path.join(_DUMP.value, "**", "*"), recursive=True):
      if not os.path.isfile(path):
        continue
      try:
        text = open(path, errors="ignore").read()
      except OSError:
        continue
      for needle in counts:
        n = text.count(needle)
        counts[needle] += n
        if n:
          holders.add(os.path.basename(path))
    print(f"dump: tensor-core instructions {counts} in {sorted(holders)[:8]}")

if __name__ == "__main__":
  sys.exit(app.run(main))
