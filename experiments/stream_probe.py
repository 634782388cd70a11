"""How fast a Pallas-Triton program grid streams expert weights, by tile shape: the memory-bound GEMM's ceiling.

Our GEMM1 reads the touched experts' weights at 3.4-3.7 TB/s at T=14-901 where a contiguous XLA read runs
at 4.51 (`read_bandwidth.py`). Each K step of the GEMM loads a (block_n x 128) weight tile: 128 bytes a
row at a 7168-byte stride. This probe streams the same [E, N, K] FP8 weights with the same loop and
grid shape (one program per (expert, N-tile), K in steps of block_k, Triton's software pipeline of
`num_stages`) and varies the tile, to see whether longer row segments, more warps or deeper pipelines
read faster, with (mode "dot": a 16-row FP8 activation tile times the weight tile, as GEMM1 at small T)
or without (mode "max": a running elementwise max, next to no arithmetic) the tensor-core work.

    PYTHONPATH=. python3 experiments/stream_probe.py --experts=14 --out=stream.jsonl
"""

from __future__ import annotations

import functools
import itertools
import json
import statistics

from absl import app, flags

_EXPERTS = flags.DEFINE_integer("experts", 14, "Experts streamed (T=14 touches 14, T=16 8).")
_N = flags.DEFINE_integer("n", 4096, "Weight rows per expert (GEMM1: 2I = 4096).")
_K = flags.DEFINE_integer("k", 7168, "Weight columns (GEMM1: H = 7168).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per variant.")
_OUT = flags.DEFINE_string("out", "", "JSONL output (optional).")
_SET = flags.DEFINE_enum("set", "tiles", ["tiles", "segments", "split", "block_major"],
                         "tiles: the (block_n x block_k) grid of PERF 14; segments: narrow N-tiles whose K step "
                         "is several 128-wide sub-tiles loaded together (as GEMM1's k_unroll), for long row "
                         "segments; split: K split over several programs per N-tile, for few experts (T=1-7 "
                         "touches 2: 32 N-tiles of 256 rows for 132 SMs); block_major: GEMM1's tiles with the "
                         "weights in [E, N, K] and in block-major [E, N/128, K/128, 128, 128] order (each "
                         "128 x 128 scale block 16 KB in a row), side by side.")


def block_major(w):
  """[E, N, K] -> [E, N/128, K/128, 128, 128]: each 128 x 128 block (one weight scale's) contiguous."""
  e, n, k = w.shape
  return w.reshape(e, n // 128, 128, k // 128, 128).transpose(0, 1, 3, 2, 4)


def stream_block_major(w, a, *, block_n, num_warps, num_stages, interpret=False):
  """`stream(mode="dot", block_k=128)` over block-major weights (`block_major`): a K step's (block_n x 128)
  weight tile is block_n // 128 whole blocks (or a part of one), each one contiguous load."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton

  from moe_pallas.kernels.triton_internals import dot_nt

  num_experts, n_blocks, k_steps, _, _ = w.shape
  rows_per_load = min(block_n, 128)
  n_tiles = n_blocks * 128 // block_n

  def kernel(w_ref, a_ref, out_ref):
    pid = pl.program_id(0)
    expert, j = pid // n_tiles, pid % n_tiles
    first_row = j * block_n

    num_loads = max(block_n // 128, 1)

    def step(s, carry):
      ks = pl.ds(pl.multiple_of(s * 128, 128), 128)
      a_tile = a_ref[:, ks]
      loads = []
      for u in range(num_loads):  # every load before any dot
        row = first_row + u * 128
        loads.append(w_ref[expert, row // 128, s, pl.ds(pl.multiple_of(row % 128, rows_per_load), rows_per_load), :])
      return tuple(acc + dot_nt(a_tile, tile) for acc, tile in zip(carry, loads))

    zeros = jnp.zeros((a.shape[0], rows_per_load), jnp.float32)
    result = jax.lax.fori_loop(0, k_steps, step, (zeros,) * num_loads)
    for u, acc in enumerate(result):
      out_ref[pid, pl.ds(u * rows_per_load, rows_per_load)] = jnp.sum(acc, axis=0)

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((num_experts * n_tiles, block_n), jnp.float32),
      grid=(num_experts * n_tiles,), interpret=interpret, name="stream_block_major",
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages))(w, a)


def stream(w, a, *, mode, block_n, block_k, num_warps, num_stages, sub_k=None, splits=1, interpret=False):
  """Reads all of w [E, N, K] in (block_n x block_k) tiles; returns a small per-program result.

  With sub_k (mode "dot" only), each K step loads block_k // sub_k tiles of (block_n x sub_k) and runs one
  dot per sub-tile, as the block-scaled GEMM does for each 128-wide scale group. With splits, each N-tile's
  K steps are split over that many programs (contiguous ranges), as split-K or stream-K GEMMs do.
  """
  import jax
  import jax.numpy as jnp
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton

  from moe_pallas.kernels.triton_internals import dot_nt

  num_experts, n, k = w.shape
  n_tiles, k_steps = n // block_n, k // block_k
  steps_per_split = pl.cdiv(k_steps, splits)
  rows = a.shape[0]

  def kernel(w_ref, a_ref, out_ref):
    pid = pl.program_id(0)
    tile, split = pid // splits, pid % splits
    expert, j = tile // n_tiles, tile % n_tiles
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)

    def step(s, carry):
      ks = pl.ds(pl.multiple_of(s * block_k, block_k), block_k)
      if sub_k:
        subs = [pl.ds(pl.multiple_of(s * block_k + u * sub_k, sub_k), sub_k) for u in range(block_k // sub_k)]
        tiles = [(a_ref[:, ds], w_ref[expert, cols, ds]) for ds in subs]  # every load before any dot
        for a_tile, w_tile in tiles:
          carry = carry + dot_nt(a_tile, w_tile)
        return carry
      tile = w_ref[expert, cols, ks]
      if mode == "max":
        return jnp.maximum(carry, tile.view(jnp.uint8))
      return carry + dot_nt(a_ref[:, ks], tile)

    init = (jnp.zeros((block_n, block_k), jnp.uint8) if mode == "max"
            else jnp.zeros((rows, block_n), jnp.float32))
    result = jax.lax.fori_loop(split * steps_per_split, jnp.minimum((split + 1) * steps_per_split, k_steps), step,
                               init)
    if mode == "max":
      out_ref[pid] = jnp.max(result.astype(jnp.float32), axis=1)
    else:
      out_ref[pid] = jnp.sum(result, axis=0)

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((num_experts * n_tiles * splits, block_n), jnp.float32),
      grid=(num_experts * n_tiles * splits,), interpret=interpret, name=f"stream_{mode}",
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages))(w, a)


def segment_variants():
  """Narrow N-tiles with long K steps of 128-wide sub-tiles: the row segment a program reads at once."""
  out = []
  for block_n, block_k in ((256, 128), (128, 256), (64, 512), (64, 1024), (32, 512), (32, 1024), (32, 2048),
                           (16, 1024), (16, 2048)):
    for num_warps, num_stages in ((4, 2), (4, 3), (8, 3)):
      out.append(dict(mode="dot", block_n=block_n, block_k=block_k, sub_k=128, num_warps=num_warps,
                      num_stages=num_stages))
  return out


def split_variants():
  """Few experts' weights (T=1-7: 2 experts, 58.7 MB) over 128-1024 programs: K split in contiguous ranges."""
  out = []
  for block_n, block_k, sub_k in ((256, 128, None), (128, 128, None), (128, 256, 128), (64, 512, 128),
                                  (64, 128, None)):
    for splits in (2, 4, 8, 16):
      if (4096 // block_n) * 2 * splits > 2048:
        continue
      for num_warps, num_stages in ((4, 3), (8, 4), (4, 4)):
        out.append(dict(mode="dot", block_n=block_n, block_k=block_k, sub_k=sub_k, splits=splits,
                        num_warps=num_warps, num_stages=num_stages))
  return out


def block_major_variants():
  """GEMM1's and GEMM2's Triton tiles at small T (128 or 256 rows, 64 for GEMM2; 4 or 8 warps), each over
  both weight orders."""
  out = []
  for block_n, num_warps, num_stages in ((256, 8, 3), (256, 4, 2), (128, 4, 3), (128, 8, 3), (64, 4, 3), (128, 4, 4)):
    for order in ("standard", "block_major"):
      out.append(dict(mode="dot", order=order, block_n=block_n, block_k=128, num_warps=num_warps,
                      num_stages=num_stages))
  return out


def variants():
  out = []
  for mode in ("max", "dot"):
    for block_n, block_k in ((256, 128), (128, 128), (128, 256), (64, 512), (128, 512), (256, 256)):
      for num_warps, num_stages in ((4, 3), (4, 4), (8, 3), (8, 5)):
        if mode == "max" and block_n * block_k > 256 * 256:
          continue
        out.append(dict(mode=mode, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages))
  return out


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from experiments.timing import GpuTimer

  key = jax.random.key(0)
  w = jax.random.bits(key, (_EXPERTS.value, _N.value, _K.value), jnp.uint8)
  w = jax.lax.bitcast_convert_type(w & jnp.uint8(0x77), jnp.float8_e4m3fn)  # finite values only
  a = jax.random.normal(key, (16, _K.value), jnp.float32).astype(jnp.float8_e4m3fn)
  nbytes = w.size
  timer = GpuTimer()
  device = jax.devices()[0].device_kind
  out = open(_OUT.value, "w") if _OUT.value else None
  w_blocked = jax.block_until_ready(block_major(w)) if _SET.value == "block_major" else None
  for v in {"tiles": variants, "segments": segment_variants, "split": split_variants,
            "block_major": block_major_variants}[_SET.value]():
    try:
      if v.get("order") == "block_major":
        fn, weights = jax.jit(functools.partial(stream_block_major, block_n=v["block_n"], num_warps=v["num_warps"],
                                                num_stages=v["num_stages"])), w_blocked
      else:
        fn, weights = jax.jit(functools.partial(stream, **{k: x for k, x in v.items() if k != "order"})), w
      jax.block_until_ready(fn(weights, a))
      times = timer.time_calls(fn, (weights, a), iters=_ITERS.value, warmup=2)
    except Exception as err:  # one variant that does not compile must not hide the others
      print(f"{v}: FAILED {type(err).__name__}: {str(err)[:200]}", flush=True)
      continue
    span = statistics.median(times.span_us)
    row = dict(**v, experts=_EXPERTS.value, bytes=nbytes, span_us=round(span, 2),
               tb_per_s=round(nbytes / span / 1e6, 3), device=device)
    print(json.dumps(row), flush=True)
    if out:
      out.write(json.dumps(row) + "\n")
      out.flush()


if __name__ == "__main__":
  app.run(main)
