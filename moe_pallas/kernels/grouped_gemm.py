"""FP8 block-scale grouped GEMMs over expert-sorted rows, as Pallas kernels lowered through Triton.

Both kernels take rows already padded to whole M-tiles of one expert (see schedule.py); the expert of
tile `i` is read inside the kernel from `tile_expert`, and a tile of no expert exits at once, so an
expert that no token picked costs no weight reads. The grid is 1-D over (M-tile, N-tile) pairs in
Triton's grouped order (`group_m` M-tiles per N sweep) to keep weight and activation tiles in L2.

GEMM1 with `tiling.split_k > 1` runs as two kernels: K-range partials into a float32 workspace, then
their fixed-order sum with the SwiGLU + quant epilogue (the epilogue needs full K sums).

Scales: activations 1x128 (stored [K/128, rows] so a tile's scales are one contiguous load), weights
128x128. Per K step: `acc = fma(dot_nt(a, w), row_scale * weight_scale, acc)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moe_pallas import weight_layout
from moe_pallas.config import SCALE_BLOCK as _SCALE_BLOCK
from moe_pallas.kernels import schedule, swiglu_quant
from moe_pallas.kernels.tiling import GemmTiling
from moe_pallas.kernels.triton_internals import dot_nt, fma
from moe_pallas.quant import FP8_DTYPE


def _tile_coordinates(num_m_tiles: int, num_n_tiles: int, group_m: int):
  """(M-tile, N-tile) of this program in grouped order: group_m M-tiles share each N sweep."""
  return schedule.grouped_coordinates(pl.program_id(0), num_m_tiles, num_n_tiles, group_m)


def _k_loop(k_start, k_stop, scales_of_step, k_step, acc, *, unroll):
  """acc after `k_step(k, scales, acc)` for K steps k_start .. k_stop - 1, `unroll` steps a loop iteration
  (their tile loads issued together: `GemmTiling.k_unroll`; the range starts and ends on a group,
  `check_k_steps`). Each step's scales are loaded one group ahead, through the loop carry: Triton pipelines
  the tile loads that feed the dots, not these small ones, whose latency would otherwise stall every step.
  The last group reloads its own scales, an unused in-bounds load."""
  def scales_of_group(k):  # the scales of K steps k .. k + unroll - 1
    return tuple(scales_of_step(k if u == 0 else k + u) for u in range(unroll))

  def group(g, carry):
    acc, scales = carry
    k = g if unroll == 1 else g * unroll
    next_scales = scales_of_group(jnp.minimum(k + unroll, k_stop - unroll))
    for u, step_scales in enumerate(scales):
      acc = k_step(k if u == 0 else k + u, step_scales, acc)
    return acc, next_scales

  bounds = (k_start, k_stop) if unroll == 1 else (k_start // unroll, k_stop // unroll)
  acc, _ = jax.lax.fori_loop(*bounds, group, (acc, scales_of_group(k_start)))
  return acc


def weight_tile(w_ref, expert, row0, rows: int, k0, cols: int):
  """W[expert, row0 : row0 + rows, k0 : k0 + cols] from [E, N, K] weights, or from block-major ones
  ([E, N/128, K/128, 128, 128], `moe_pallas.weight_layout`): there the tile lies in one 128 x 128 block
  (rows and cols divide 128, row0 and k0 multiples of them), a contiguous read of rows x 128 bytes."""
  if w_ref.ndim == 3:
    return w_ref[expert, pl.ds(pl.multiple_of(row0, rows), rows), pl.ds(pl.multiple_of(k0, cols), cols)]
  # lax's truncating div and rem (the offsets are >= 0): jnp's floor forms lower to a select on an i1 that
  # Pallas-Triton's rule for `rem` cannot type (jax 0.11.2).
  n_block, n_within = jax.lax.div(jnp.int32(row0), _SCALE_BLOCK), jax.lax.rem(jnp.int32(row0), _SCALE_BLOCK)
  k_block, k_within = jax.lax.div(jnp.int32(k0), _SCALE_BLOCK), jax.lax.rem(jnp.int32(k0), _SCALE_BLOCK)
  return w_ref[expert, n_block, k_block, pl.ds(pl.multiple_of(n_within, rows), rows),
               pl.ds(pl.multiple_of(k_within, cols), cols)]


def _tile_product(a, w, swap_ab: bool):
  """a [bm, bk] @ w [bn, bk].T in float32 as [bm, bn], or with `GemmTiling.swap_ab` as its transpose
  w @ a.T [bn, bm]: the weight tile is then the MMA's row operand (wgmma takes 64 rows of it at a time)
  and the few activation rows its columns."""
  return dot_nt(w, a) if swap_ab else dot_nt(a, w)


def _per_row(factor, swap_ab: bool):
  """A per-row [bm] factor, broadcast against `_tile_product`'s result."""
  return factor[None, :] if swap_ab else factor[:, None]


def _zero_accumulator(tiling: GemmTiling):
  shape = (tiling.block_n, tiling.block_m) if tiling.swap_ab else (tiling.block_m, tiling.block_n)
  return jnp.zeros(shape, jnp.float32)


def gemm1_accumulate(tile_expert_ref, row_token_ref, a_ref, a_scale_ref, w_ref, w_scale_ref, *, i, j, k_start,
                     num_k_steps, intermediate, tiling):
  """M-tile i's up and gate accumulators (N-tile j) over K steps k_start .. k_start + num_k_steps."""
  expert = tile_expert_ref[i]
  bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
  rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
  up_scale_row = j * bn // _SCALE_BLOCK
  gate_scale_row = (intermediate + j * bn) // _SCALE_BLOCK
  # The gather of each row's token is fused into the loads: no [rows, H] copy of the activations.
  tokens = row_token_ref[rows]
  k_stop = k_start + num_k_steps

  def scales_of_step(k):
    row_scale = a_scale_ref[k, tokens]
    return (row_scale * w_scale_ref[expert, up_scale_row, k],
            row_scale * w_scale_ref[expert, gate_scale_row, k])

  def k_step(k, scales, accs):
    (up_scale, gate_scale), (acc_up, acc_gate) = scales, accs
    ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
    a = a_ref[tokens, ks]
    swap = tiling.swap_ab
    w_up = weight_tile(w_ref, expert, j * bn, bn, k * bk, bk)
    w_gate = weight_tile(w_ref, expert, intermediate + j * bn, bn, k * bk, bk)
    acc_up = fma(_tile_product(a, w_up, swap), _per_row(up_scale, swap), acc_up)
    acc_gate = fma(_tile_product(a, w_gate, swap), _per_row(gate_scale, swap), acc_gate)
    return acc_up, acc_gate

  zeros = _zero_accumulator(tiling)
  acc_up, acc_gate = _k_loop(k_start, k_stop, scales_of_step, k_step, (zeros, zeros), unroll=tiling.k_unroll)
  if tiling.swap_ab:
    return acc_up.T, acc_gate.T
  return acc_up, acc_gate


def store_swiglu(acc_up, acc_gate, out_ref, out_scale_refs, *, i, j, tiling, quantize_output):
  """SwiGLU of one (M-tile, N-tile), stored as FP8 with one scale per row of the tile (or as bf16)."""
  bm, bn = tiling.block_m, tiling.block_n
  rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
  cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
  swiglu = swiglu_quant.silu(acc_gate) * acc_up  # silu on the SECOND half of W13's output (SPEC.md step 6)
  if quantize_output:
    [out_scale_ref] = out_scale_refs
    values, scale = swiglu_quant.quantized_rows(swiglu, jnp.max(jnp.abs(swiglu), axis=1))
    out_ref[rows, cols] = values.astype(out_ref.dtype)
    out_scale_ref[j, rows] = scale
  else:
    out_ref[rows, cols] = swiglu.astype(out_ref.dtype)


def swiglu_out_shape(num_rows: int, intermediate: int, block_n: int, out_dtype) -> list[jax.ShapeDtypeStruct]:
  """The SwiGLU output: values [rows, I], and with an FP8 out_dtype one scale per (row, block_n columns)
  as [I/block_n, rows] (GEMM2 reads it with K steps of block_n)."""
  out_shape = [jax.ShapeDtypeStruct((num_rows, intermediate), out_dtype)]
  if jnp.dtype(out_dtype) == jnp.dtype(FP8_DTYPE):
    out_shape.append(jax.ShapeDtypeStruct((intermediate // block_n, num_rows), jnp.float32))
  return out_shape


def _gemm1_swiglu_kernel(*refs, num_m_tiles, num_n_tiles, num_k_steps, intermediate, num_local_experts, tiling,
                         quantize_output, used_tiles_range, num_aliased):
  tile_expert_ref, row_token_ref, a_ref, a_scale_ref, w_ref, w_scale_ref, *rest = refs
  if used_tiles_range is not None:
    used_tiles_ref, *rest = rest
  out_ref, *out_scale_refs = rest[num_aliased:]  # aliased inputs are written through the outputs
  i, j = _tile_coordinates(num_m_tiles, num_n_tiles, tiling.group_m)
  runs = tile_expert_ref[i] < num_local_experts
  if used_tiles_range is not None:
    used = used_tiles_ref[0]
    runs = runs & (used >= used_tiles_range[0]) & (used < used_tiles_range[1])

  @pl.when(runs)
  def _():
    acc_up, acc_gate = gemm1_accumulate(tile_expert_ref, row_token_ref, a_ref, a_scale_ref, w_ref, w_scale_ref,
                                        i=i, j=j, k_start=0, num_k_steps=num_k_steps,
                                        intermediate=intermediate, tiling=tiling)
    store_swiglu(acc_up, acc_gate, out_ref, out_scale_refs, i=i, j=j, tiling=tiling,
                 quantize_output=quantize_output)


def _gemm1_partial_kernel(tile_expert_ref, row_token_ref, a_ref, a_scale_ref, w_ref, w_scale_ref, partial_ref, *,
                          num_m_tiles, num_n_tiles, num_k_steps, intermediate, num_local_experts, tiling):
  # Split-K: program (tile, split) sums K steps split*S .. (split+1)*S - 1 into columns
  # split*2I + [up | gate] of the float32 workspace.
  i, j = _tile_coordinates(num_m_tiles, num_n_tiles, tiling.group_m)
  split = pl.program_id(1)
  steps_per_split = num_k_steps // tiling.split_k

  @pl.when(tile_expert_ref[i] < num_local_experts)
  def _():
    acc_up, acc_gate = gemm1_accumulate(tile_expert_ref, row_token_ref, a_ref, a_scale_ref, w_ref, w_scale_ref,
                                        i=i, j=j, k_start=split * steps_per_split, num_k_steps=steps_per_split,
                                        intermediate=intermediate, tiling=tiling)
    bm, bn = tiling.block_m, tiling.block_n
    rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
    base = split * 2 * intermediate
    partial_ref[rows, pl.ds(pl.multiple_of(base + j * bn, bn), bn)] = acc_up
    partial_ref[rows, pl.ds(pl.multiple_of(base + intermediate + j * bn, bn), bn)] = acc_gate


def _swiglu_of_partials_kernel(tile_expert_ref, partial_ref, out_ref, *out_scale_refs, num_n_tiles, intermediate,
                               num_local_experts, tiling, quantize_output):
  # Sums the split-K partials in a fixed order (split 0, 1, ...: bit-identical repeats, no atomics),
  # then the same SwiGLU + quant epilogue as the unsplit kernel.
  pid = pl.program_id(0)
  i, j = pid // num_n_tiles, pid % num_n_tiles

  @pl.when(tile_expert_ref[i] < num_local_experts)
  def _():
    bm, bn = tiling.block_m, tiling.block_n
    rows = pl.ds(pl.multiple_of(i * bm, bm), bm)

    def partial(split, offset):
      return partial_ref[rows, pl.ds(pl.multiple_of(split * 2 * intermediate + offset + j * bn, bn), bn)]

    acc_up, acc_gate = partial(0, 0), partial(0, intermediate)
    for split in range(1, tiling.split_k):
      acc_up = acc_up + partial(split, 0)
      acc_gate = acc_gate + partial(split, intermediate)
    store_swiglu(acc_up, acc_gate, out_ref, out_scale_refs, i=i, j=j, tiling=tiling,
                 quantize_output=quantize_output)


def check_k_steps(num_k_steps: int, tiling: GemmTiling, what: str) -> None:
  """Each of the split_k K ranges must hold whole groups of k_unroll K steps."""
  if num_k_steps % (tiling.split_k * tiling.k_unroll):
    raise ValueError(f"tiling.split_k * tiling.k_unroll must divide the {num_k_steps} K steps of {what}, got "
                     f"split_k={tiling.split_k}, k_unroll={tiling.k_unroll}")


def gemm1_geometry(tile_expert, row_token, a, w13, tiling: GemmTiling):
  """(rows, E_local, 2I, M-tiles, N-tiles, K steps) of a GEMM1 call, its rows and K step checked."""
  num_rows = row_token.shape[0]
  num_local, two_i, _ = weight_layout.logical_shape(w13)
  num_m_tiles = tile_expert.shape[0]
  if num_rows != num_m_tiles * tiling.block_m:
    raise ValueError(f"row_token has {num_rows} rows, expected num_tiles * block_m = "
                     f"{num_m_tiles * tiling.block_m}")
  if tiling.block_k != _SCALE_BLOCK:
    raise ValueError(f"gemm1_swiglu needs block_k = {_SCALE_BLOCK} (one activation scale per K step), got "
                     f"{tiling.block_k}")
  return num_rows, num_local, two_i, num_m_tiles, (two_i // 2) // tiling.block_n, a.shape[1] // tiling.block_k


def gemm1_swiglu(tile_expert, row_token, a, a_scale, w13, w13_scale, *, tiling: GemmTiling,
                 out_dtype=FP8_DTYPE, interpret=False, used_tiles=None, used_tiles_range=None, into=None):
  """Grouped `swiglu(a[row_token] @ W13[e].T)` per M-tile, quantized to FP8 in 1 x block_n blocks or bf16.

  Args:
    tile_expert: [num_tiles] int32 (E_local for tiles of no expert).
    row_token: [num_tiles * block_m] int32, the token row of `a` that each padded row reads.
    a: [T, H] float8_e4m3fn activations; a_scale: [H/128, T] float32 (the public layout).
    w13: [E_local, 2I, H] float8_e4m3fn, or block-major (`weight_tile`); w13_scale: [E_local, 2I/128, H/128]
      float32.
    out_dtype: float8_e4m3fn (returns values [rows, I] and scales [I/block_n, rows]: a finer block than
      1x128 when block_n < 128, which only helps accuracy) or bfloat16 (values only).
    used_tiles, used_tiles_range: a [1] int32 count of the M-tiles in use and a static [lo, hi): the kernel
      computes only if lo <= count < hi (else every program exits at once). Two calls with disjoint
      ranges, the second writing `into` the first's outputs, pick their tiles by the count on the device.
    into: outputs of an earlier call (same tiles) that this call writes into, in place.

  Returns:
    (values, scales or None). Rows of tiles of no expert are left unwritten.
  """
  num_rows, num_local, two_i, num_m_tiles, num_n_tiles, num_k_steps = gemm1_geometry(tile_expert, row_token, a,
                                                                                     w13, tiling)
  intermediate = two_i // 2
  hidden = a.shape[1]
  quantize_output = jnp.dtype(out_dtype) == jnp.dtype(FP8_DTYPE)
  check_k_steps(num_k_steps, tiling, f"H={hidden}")
  params = pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)
  selected = used_tiles_range is not None
  # A call that computes only below `hi` used tiles needs programs for hi - 1 tiles at most: fewer to
  # launch where the other call computes and these all exit at once.
  grid_m_tiles = min(num_m_tiles, max(used_tiles_range[1] - 1, 1)) if selected else num_m_tiles
  grid = (grid_m_tiles * num_n_tiles,)

  into = tuple(x for x in into if x is not None) if into is not None else None  # bf16: no scales
  if (selected or into is not None) and tiling.split_k > 1:
    raise NotImplementedError("used_tiles_range and into need an unsplit GEMM1 (split_k = 1)")
  extra = ((used_tiles.reshape(1),) if selected else ()) + tuple(into or ())
  aliases = {6 + selected + k: k for k in range(len(into or ()))}
  operands = (tile_expert, row_token, a, a_scale, w13, w13_scale)

  if tiling.split_k > 1:
    kernel = functools.partial(
        _gemm1_partial_kernel, num_m_tiles=num_m_tiles, num_n_tiles=num_n_tiles, num_k_steps=num_k_steps,
        intermediate=intermediate, num_local_experts=num_local, tiling=tiling)
    partials = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((num_rows, tiling.split_k * two_i), jnp.float32),
        grid=(*grid, tiling.split_k), interpret=interpret, name="moe_gemm1_split_k", compiler_params=params,
    )(*operands)
    return swiglu_of_partials(tile_expert, partials, num_local_experts=num_local, tiling=tiling,
                              out_dtype=out_dtype, interpret=interpret, name="moe_gemm1_split_k_swiglu")
  kernel = functools.partial(
      _gemm1_swiglu_kernel, num_m_tiles=grid_m_tiles, num_n_tiles=num_n_tiles,
      num_k_steps=num_k_steps, intermediate=intermediate, num_local_experts=num_local,
      tiling=tiling, quantize_output=quantize_output, used_tiles_range=used_tiles_range, num_aliased=len(aliases))
  outs = pl.pallas_call(
      kernel, out_shape=swiglu_out_shape(num_rows, intermediate, tiling.block_n, out_dtype), grid=grid,
      interpret=interpret, input_output_aliases=aliases,
      name="moe_gemm1_swiglu_fp8" if quantize_output else "moe_gemm1_swiglu_bf16", compiler_params=params,
  )(*operands, *extra)
  return (outs[0], outs[1]) if quantize_output else (outs[0], None)


def swiglu_of_partials(tile_expert, partials, *, num_local_experts: int, tiling: GemmTiling, out_dtype=FP8_DTYPE,
                       interpret=False, name: str = "moe_swiglu"):
  """GEMM1's epilogue from float32 partial products: `partials` [rows, split_k * 2I] holds split s's
  [up | gate] columns at s * 2I (split_k = tiling.split_k); their fixed-order sum, SwiGLU, and the FP8
  quant in 1 x block_n blocks (or bf16), as `gemm1_swiglu` returns them. Tiles of no expert exit at once."""
  num_rows, width = partials.shape
  intermediate = width // (2 * tiling.split_k)
  num_m_tiles = tile_expert.shape[0]
  if num_rows != num_m_tiles * tiling.block_m or width != 2 * intermediate * tiling.split_k:
    raise ValueError(f"partials must be [num_tiles * block_m, split_k * 2I], got {partials.shape} for "
                     f"{num_m_tiles} tiles of {tiling.block_m} rows and split_k={tiling.split_k}")
  num_n_tiles = intermediate // tiling.block_n
  quantize_output = jnp.dtype(out_dtype) == jnp.dtype(FP8_DTYPE)
  kernel = functools.partial(
      _swiglu_of_partials_kernel, num_n_tiles=num_n_tiles, intermediate=intermediate,
      num_local_experts=num_local_experts, tiling=tiling, quantize_output=quantize_output)
  outs = pl.pallas_call(
      kernel, out_shape=swiglu_out_shape(num_rows, intermediate, tiling.block_n, out_dtype),
      grid=(num_m_tiles * num_n_tiles,), interpret=interpret, name=f"{name}_fp8" if quantize_output else f"{name}_bf16",
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
  )(tile_expert, partials)
  return (outs[0], outs[1]) if quantize_output else (outs[0], None)


def _transpose_scales(expert, src_ref, dst_ref):
  """dst[expert, kb, c] = src[expert, c, kb], zero for c past src's rows: one expert's [N', K'] block scales
  as [K', C] (C >= N'), in one tile (Triton tiles are powers of two: masked past the edges)."""
  _, n_blocks, k_blocks = src_ref.shape
  c = jnp.arange(pl.next_power_of_2(dst_ref.shape[2]), dtype=jnp.int32)
  kb = jnp.arange(pl.next_power_of_2(k_blocks), dtype=jnp.int32)
  # Clamped load indices (interpret mode has no rule for masked loads out of bounds); the mask zeroes them.
  safe_c, safe_kb = jnp.minimum(c, n_blocks - 1), jnp.minimum(kb, k_blocks - 1)
  scales = pltriton.load(src_ref.at[expert, safe_c[:, None], safe_kb[None, :]],
                         mask=(c < n_blocks)[:, None] & (kb < k_blocks)[None, :], other=0.0)
  pltriton.store(dst_ref.at[expert, kb[:, None], c[None, :]], scales.T,
                 mask=(kb < k_blocks)[:, None] & (c < dst_ref.shape[2])[None, :])


def _gather_rows_kernel(tile_expert_ref, row_token_ref, a_ref, a_scale_ref, *refs, block_m, block_h,
                        num_local_experts, num_m_tiles, num_h_blocks, num_transposed):
  scale_refs = refs[:num_transposed]
  out_ref, out_scale_ref, *transposed_refs = refs[num_transposed:]
  i, j = pl.program_id(0), pl.program_id(1)
  for s, (src_ref, dst_ref) in enumerate(zip(scale_refs, transposed_refs)):  # program (e, s): expert e's
    pl.when((i < src_ref.shape[0]) & (j == s))(functools.partial(_transpose_scales, i, src_ref, dst_ref))

  # The grid may be larger than the rows need (room for the scales' programs): min() keeps the reads in bounds.
  @pl.when((i < num_m_tiles) & (j < num_h_blocks)
           & (tile_expert_ref[jnp.minimum(i, num_m_tiles - 1)] < num_local_experts))
  def _():
    rows = pl.ds(pl.multiple_of(i * block_m, block_m), block_m)
    tokens = row_token_ref[rows]
    out_ref[rows, pl.ds(pl.multiple_of(j * block_h, block_h), block_h)] = (
        a_ref[tokens, pl.ds(pl.multiple_of(j * block_h, block_h), block_h)])
    for kb in range(block_h // _SCALE_BLOCK):  # this column chunk's scale rows
      scale_row = j * (block_h // _SCALE_BLOCK) + kb
      out_scale_ref[scale_row, rows] = a_scale_ref[scale_row, tokens]


def gather_rows(tile_expert, row_token, a, a_scale, *, block_m: int, num_local_experts: int, interpret=False,
                transposed_scales=()):
  """The activations of each padded row, in row order: `a[row_token]` [rows, H] and
  `a_scale[:, row_token]` [H/128, rows], written for tiles of an expert only (a TMA-fed GEMM cannot gather
  rows in its loads; the schedule's rows are sized for the worst case, of which few are used at large T).
  Rows of tiles of no expert are left unwritten.

  transposed_scales: pairs (w_scale [E, N', K'] float32, C >= N'): each also comes back as [E, K', C],
  `out[e, kb, c] = w_scale[e, c, kb]`, zero for c >= N' (the Mosaic GEMMs' weight-scale layout, see
  `mosaic_gemm.weight_scale_rows`), laid out by programs of this kernel instead of XLA kernels of their own.
  """
  num_rows = row_token.shape[0]
  hidden = a.shape[1]
  num_m_tiles = tile_expert.shape[0]
  if num_rows != num_m_tiles * block_m:
    raise ValueError(f"row_token has {num_rows} rows, expected num_tiles * block_m = {num_m_tiles * block_m}")
  for w_scale, cols in transposed_scales:
    if w_scale.ndim != 3 or w_scale.dtype != jnp.float32 or cols < w_scale.shape[1]:
      raise ValueError(f"transposed_scales takes ([E, N', K'] float32, C >= N') pairs, got {w_scale.dtype}"
                       f"{list(w_scale.shape)} with C={cols}")
  block_h = next(b for b in (1024, 512, 256, 128) if hidden % b == 0)
  num_h_blocks = hidden // block_h
  grid = (max([num_m_tiles] + [w.shape[0] for w, _ in transposed_scales]),
          max(num_h_blocks, len(transposed_scales)))
  kernel = functools.partial(_gather_rows_kernel, block_m=block_m, block_h=block_h,
                             num_local_experts=num_local_experts, num_m_tiles=num_m_tiles,
                             num_h_blocks=num_h_blocks, num_transposed=len(transposed_scales))
  return pl.pallas_call(
      kernel, out_shape=(jax.ShapeDtypeStruct((num_rows, hidden), a.dtype),
                         jax.ShapeDtypeStruct((hidden // _SCALE_BLOCK, num_rows), a_scale.dtype),
                         *[jax.ShapeDtypeStruct((w.shape[0], w.shape[2], cols), w.dtype)
                           for w, cols in transposed_scales]),
      grid=grid, interpret=interpret, name="moe_gather_rows",
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
  )(tile_expert, row_token, a, a_scale, *[w for w, _ in transposed_scales])


def gemm2_program(num_m_tiles: int, num_n_tiles: int, tiling: GemmTiling):
  """(M-tile, N-tile, K range) of this GEMM2 program (the grid of `gemm2_weighted`)."""
  i, j = _tile_coordinates(num_m_tiles, num_n_tiles, tiling.group_m)
  return i, j, pl.program_id(1) if tiling.split_k > 1 else 0


def gemm2_tile(tile_expert_ref, c_ref, c_scale_ref, w_ref, w_scale_ref, row_weight_ref, out_ref, *, i, j, split,
               num_m_tiles, num_k_steps, num_local_experts, tiling):
  """GEMM2's (M-tile i, N-tile j) over K range `split`, weighted by the rows' routing weights, stored at rows
  split * num_rows + ... of out_ref (a tile of no expert stores nothing)."""
  scaled_input = c_scale_ref is not None  # None: a bf16 intermediate, no activation scales
  expert = tile_expert_ref[i]
  # Split-K: program (tile, split) sums K steps split*S .. (split+1)*S - 1 into rows split*num_rows + ...
  steps = num_k_steps // tiling.split_k
  k_start, k_stop = split * steps, split * steps + steps

  @pl.when(expert < num_local_experts)
  def _():
    bm, bn, bk = tiling.block_m, tiling.block_n, tiling.block_k
    rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
    weight_scale_row = j * bn // _SCALE_BLOCK
    out_rows = pl.ds(pl.multiple_of(split * num_m_tiles * bm + i * bm, bm), bm)

    def scale_of_step(k):
      weight_scale = w_scale_ref[expert, weight_scale_row, k * bk // _SCALE_BLOCK]
      if scaled_input:
        return c_scale_ref[k, rows] * weight_scale
      return jnp.full((bm,), weight_scale, jnp.float32)

    def k_step(k, scale, acc):
      ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
      w = weight_tile(w_ref, expert, j * bn, bn, k * bk, bk)
      a = c_ref[rows, ks]
      if not scaled_input:
        w = w.astype(c_ref.dtype)
      return fma(_tile_product(a, w, tiling.swap_ab), _per_row(scale, tiling.swap_ab), acc)

    acc = _k_loop(k_start, k_stop, scale_of_step, k_step, _zero_accumulator(tiling), unroll=tiling.k_unroll)
    if tiling.swap_ab:
      acc = acc.T
    out_ref[out_rows, cols] = (acc * row_weight_ref[rows][:, None]).astype(out_ref.dtype)


def _gemm2_kernel(tile_expert_ref, c_ref, c_scale_ref, w_ref, w_scale_ref, row_weight_ref, out_ref, *, num_m_tiles,
                  num_n_tiles, num_k_steps, num_local_experts, tiling):
  i, j, split = gemm2_program(num_m_tiles, num_n_tiles, tiling)
  gemm2_tile(tile_expert_ref, c_ref, c_scale_ref, w_ref, w_scale_ref, row_weight_ref, out_ref, i=i, j=j, split=split,
             num_m_tiles=num_m_tiles, num_k_steps=num_k_steps, num_local_experts=num_local_experts, tiling=tiling)


def gemm2_geometry(tile_expert, c, c_scale, w2, tiling: GemmTiling, out_dtype):
  """(rows, E_local, H, M-tiles, N-tiles, K steps) of a GEMM2 call, its scales, K steps and out_dtype checked."""
  num_rows, intermediate = c.shape
  num_local, hidden, _ = weight_layout.logical_shape(w2)
  if c_scale is not None and c_scale.shape != (intermediate // tiling.block_k, num_rows):
    raise ValueError(f"c_scale must be [I/block_k, rows] = {[intermediate // tiling.block_k, num_rows]}, "
                     f"got {list(c_scale.shape)}")
  num_k_steps = intermediate // tiling.block_k
  check_k_steps(num_k_steps, tiling, f"I={intermediate}")
  if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"out_dtype must be float32 or bfloat16, got {jnp.dtype(out_dtype)}")
  return num_rows, num_local, hidden, tile_expert.shape[0], hidden // tiling.block_n, num_k_steps


def gemm2_weighted(tile_expert, c, c_scale, w2, w2_scale, row_weight, *, tiling: GemmTiling, interpret=False,
                   out_dtype=jnp.float32):
  """Grouped `row_weight * (c @ W2[e].T)` per M-tile, float32 (or bfloat16: rounded once) out.

  Args:
    tile_expert: [num_tiles] int32.
    c: [rows, I] float8_e4m3fn with c_scale [I/block_k, rows] (1 x block_k blocks), or bfloat16 with
      c_scale None.
    w2: [E_local, H, I] float8_e4m3fn, or block-major (`weight_tile`); w2_scale: [E_local, H/128, I/128] float32.
    row_weight: [rows] float32 routing weight of each row.

  Returns:
    [split_k * rows, H] out_dtype: with `tiling.split_k > 1` the K range of split s gives rows
    s * rows .. (s + 1) * rows - 1, partial sums that the combine adds (`combine_rows(num_splits=...)`).
    Rows of tiles of no expert are left unwritten.
  """
  num_rows, num_local, hidden, num_m_tiles, num_n_tiles, num_k_steps = gemm2_geometry(tile_expert, c, c_scale, w2,
                                                                                      tiling, out_dtype)
  scaled_input = c_scale is not None
  kernel = functools.partial(
      _gemm2_kernel, num_m_tiles=num_m_tiles, num_n_tiles=num_n_tiles,
      num_k_steps=num_k_steps, num_local_experts=num_local, tiling=tiling)
  grid = (num_m_tiles * num_n_tiles,) + ((tiling.split_k,) if tiling.split_k > 1 else ())
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((tiling.split_k * num_rows, hidden), out_dtype),
      grid=grid, interpret=interpret,
      name="moe_gemm2_fp8" if scaled_input else "moe_gemm2_bf16",
      compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
  )(tile_expert, c, c_scale, w2, w2_scale, row_weight)
