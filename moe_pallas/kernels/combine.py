"""Combine: each token's weighted expert rows (float32 or bfloat16) summed in float32, as a Pallas kernel.

out[t] = sum over t's local picks j of rows[pair_padded_row[j, t]]. A gather with masked loads: a pick that is
not local (pair_padded_row = num_rows) reads nothing, so the kernel moves only the rows that exist, once, and
writes every output row (zeros for tokens with no local pick). Deterministic: a fixed summation order.
XLA's gather cannot skip the non-local picks, and its scatter-add would read every padded row.

Two forms of the same sum (the same bits): block_t tokens a program with masked loads, or
(`CombineTiling.branch_per_pick`) one token a program with each pick's row loaded under a branch, so that a
pick that is not local issues no load at all; the H200 table takes the second above 2 rows per expert
(experiments/PERF.md 54: at uniform T=14107, where most tokens have 0 or 1 local pick, 128.6 -> 110.1 us).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moe_pallas.kernels.tiling import CombineTiling


def sum_token_rows(rows_ref, poison_ref, pick_row, tokens, cols, *, top_k, num_rows, num_splits):
  """[len(tokens), len(cols)] float32: each token's poison value (or 0), then its picks' rows in pick order,
  each pick's K-range partials in order (bit-identical repeats). pick_row(j): [len(tokens)] padded row of
  pick j (num_rows: not local)."""
  shape = (tokens.shape[0], cols.shape[0])
  if poison_ref is None:
    acc = jnp.zeros(shape, jnp.float32)
  else:  # NaN for tokens whose routing inputs hold a NaN (routing.nan_poison), else 0
    acc = jnp.broadcast_to(pltriton.load(poison_ref.at[tokens])[:, None], shape)
  for j in range(top_k):
    row = pick_row(j)
    local = row < num_rows
    picked = jnp.broadcast_to(local[:, None], shape)
    safe_row = jnp.minimum(row, num_rows - 1)
    for split in range(num_splits):  # GEMM2's split-K partials of the row, in a fixed order
      acc += pltriton.load(rows_ref.at[split * num_rows + safe_row[:, None], cols[None, :]], mask=picked,
                           other=0.0).astype(jnp.float32)
  return acc


def _combine_kernel(pair_padded_row_ref, rows_ref, poison_ref, out_ref, *, num_tokens, top_k, num_splits, tiling):
  # Whole-array (gather) indices everywhere: masked loads with mixed slice/array indices have no
  # interpret-mode rule, and these lower to the same coalesced pointer arithmetic in Triton.
  bt, bh = tiling.block_t, tiling.block_h
  tokens = pl.program_id(0) * bt + jnp.arange(bt, dtype=jnp.int32)
  cols = pl.program_id(1) * bh + jnp.arange(bh, dtype=jnp.int32)
  token_ok = tokens < num_tokens
  num_rows = rows_ref.shape[0] // num_splits
  safe_tokens = jnp.minimum(tokens, num_tokens - 1)
  pick_row = lambda j: pltriton.load(pair_padded_row_ref.at[safe_tokens * top_k + j], mask=token_ok, other=num_rows)
  acc = sum_token_rows(rows_ref, poison_ref, pick_row, safe_tokens, cols, top_k=top_k, num_rows=num_rows,
                       num_splits=num_splits)
  store_ok = jnp.broadcast_to(token_ok[:, None], (bt, bh))
  # Tail lanes keep their out-of-range token index (masked, so Triton writes nothing there): clamping
  # them would alias token T-1 and make interpret mode's scatter race with the real row.
  pltriton.store(out_ref.at[tokens[:, None], cols[None, :]], acc.astype(out_ref.dtype), mask=store_ok)


def _combine_token_kernel(pair_padded_row_ref, rows_ref, poison_ref, out_ref, *, top_k, num_splits, block_h):
  """`CombineTiling.branch_per_pick`: one token a program, each local pick's row added under a scalar branch
  (a pick that is not local costs one scalar load), in `sum_token_rows`' order."""
  token = pl.program_id(0)
  cols = pl.ds(pl.multiple_of(pl.program_id(1) * block_h, block_h), block_h)
  num_rows = rows_ref.shape[0] // num_splits
  start = jnp.zeros((block_h,), jnp.float32)
  if poison_ref is not None:
    start = start + poison_ref[token]
  def add_pick(j, acc):
    row = pair_padded_row_ref[token * top_k + j]
    def add_rows(acc):
      for split in range(num_splits):  # GEMM2's split-K partials of the row, in a fixed order
        acc = acc + rows_ref[split * num_rows + row, cols].astype(jnp.float32)
      return acc
    return jax.lax.cond(row < num_rows, add_rows, lambda acc: acc, acc)
  acc = functools.reduce(lambda acc, j: add_pick(j, acc), range(top_k), start)
  out_ref[token, cols] = acc.astype(out_ref.dtype)


def combine_rows(rows: jax.Array, pair_padded_row: jax.Array, *, poison: jax.Array | None = None,
                 out_dtype=jnp.float32, tiling: CombineTiling = CombineTiling(), num_splits: int = 1,
                 interpret=False) -> jax.Array:
  """Sums each token's rows.

  Args:
    rows: [num_splits * num_rows, H] float32 or bfloat16 weighted expert outputs: num_splits partial sums
      of each row (GEMM2's split-K), split s at rows s * num_rows .. (s + 1) * num_rows - 1. Summed in
      float32 either way.
    pair_padded_row: [T, top_k] int32, the row of pick (t, j), or num_rows where the pick is not local
      (passed flat, as it lies: a pick's rows of a token tile are a strided load of a few bytes, cheaper
      than the XLA transpose kernel that would make them contiguous).
    poison: optional [T] float32 added to every element of each token's row (0, or NaN where the token's
      routing inputs hold a NaN: see routing.nan_poison); read once per token tile, so it costs nothing.
    out_dtype: float32 or bfloat16 (rounded once, after the float32 sum).

  Returns:
    [T, H] out_dtype.
  """
  num_tokens, top_k = pair_padded_row.shape
  hidden = rows.shape[1]
  # Triton tensors have power-of-two sizes: the largest power of two dividing H (H = 384 gives 128).
  tiling = dataclasses.replace(tiling, block_h=min(tiling.block_h, hidden & -hidden))
  if rows.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"rows must be float32 or bfloat16, got {rows.dtype}")
  if num_splits < 1 or rows.shape[0] % num_splits:
    raise ValueError(f"rows ({rows.shape[0]}) must hold num_splits ({num_splits}) equal parts")
  if tiling.branch_per_pick:
    kernel = functools.partial(_combine_token_kernel, top_k=top_k, num_splits=num_splits, block_h=tiling.block_h)
  else:
    kernel = functools.partial(_combine_kernel, num_tokens=num_tokens, top_k=top_k, num_splits=num_splits,
                               tiling=tiling)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((num_tokens, hidden), out_dtype),
      grid=(pl.cdiv(num_tokens, tiling.block_t), hidden // tiling.block_h), interpret=interpret,
      name="moe_combine", compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=1),
  )(pair_padded_row.reshape(-1), rows, poison if poison is None else poison.astype(jnp.float32))
