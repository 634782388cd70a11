"""GEMM2 with the combine in its tail: one kernel where `grouped_gemm.gemm2_weighted` + `combine.combine_rows`
are two.

Each program computes and stores its (M-tile, N-tile[, K range]) of weighted rows as GEMM2 does, then counts
each of its real rows (not padding) on its token's arrival counter for that N-tile (one integer atomic per
row, acquire-release at GPU scope, after a barrier that orders every thread's row stores before it). The
program whose row arrives last for (token, N-tile) sums the token's rows for those columns in pick order
(and K range order), as the combine does, and stores the output: the same float32 sums in the same order,
so the same bits as the two kernels. Tokens with no local pick get no arrival; the programs of M-tile 0
write their rows (the poison value, 0 or NaN) whatever the experts touched.

Why: at T <= 80 the combine is a launch of 2-3 us plus its gap for a few rows (experiments/PERF.md 30).
The counters are a zeroed int32 input aliased to an output (an XLA memset before the kernel). For small T
only: the programs of M-tile 0 loop over all tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moe_pallas.kernels import combine, grouped_gemm
from moe_pallas.kernels.tiling import GemmTiling

MAX_TOKENS = 1024  # the programs of M-tile 0 write the rows of tokens with no local pick, in a loop over all T
_TOKENS_PER_STEP = 32  # that loop's step


def _token_rows(pair_row_ref, tokens, token_ok, *, top_k, num_rows):
  """[top_k] arrays of [len(tokens)]: the padded row of each pick of each token (num_rows: not local)."""
  return [pltriton.load(pair_row_ref.at[tokens * top_k + j], mask=token_ok, other=num_rows) for j in range(top_k)]


def _kernel(tile_expert_ref, c_ref, c_scale_ref, w_ref, w_scale_ref, row_weight_ref, row_token_ref, pair_row_ref,
            poison_ref, _, rows_ref, out_ref, arrivals_ref, *, num_m_tiles, num_n_tiles, num_k_steps, num_local_experts,
            num_tokens, top_k, tiling, interpret):
  i, j, split = grouped_gemm.gemm2_program(num_m_tiles, num_n_tiles, tiling)
  bm, bn = tiling.block_m, tiling.block_n
  num_rows = rows_ref.shape[0] // tiling.split_k
  cols = j * bn + jnp.arange(bn, dtype=jnp.int32)
  grouped_gemm.gemm2_tile(tile_expert_ref, c_ref, c_scale_ref, w_ref, w_scale_ref, row_weight_ref, rows_ref, i=i, j=j,
                          split=split, num_m_tiles=num_m_tiles, num_k_steps=num_k_steps,
                          num_local_experts=num_local_experts, tiling=tiling)
  token_rows = functools.partial(_token_rows, pair_row_ref, top_k=top_k, num_rows=num_rows)
  # The combine's own sum (the same order, the same bits), over this program's tokens and columns.
  summed = lambda picks, tokens, take: combine.sum_token_rows(
      rows_ref, poison_ref, lambda pick: picks[pick], tokens, cols, top_k=top_k, num_rows=num_rows,
      num_splits=tiling.split_k, take=take)

  @pl.when(tile_expert_ref[i] < num_local_experts)
  def _():
    if not interpret:  # every thread's row stores before any arrival (interpret mode: programs run in order)
      pltriton.debug_barrier()
    padded_rows = i * bm + jnp.arange(bm, dtype=jnp.int32)
    tokens = row_token_ref[pl.ds(pl.multiple_of(i * bm, bm), bm)]
    picks = token_rows(tokens, jnp.full((bm,), True))
    real = functools.reduce(jnp.logical_or, [row == padded_rows for row in picks])  # not a padding row
    local_picks = functools.reduce(jnp.add, [(row < num_rows).astype(jnp.int32) for row in picks])
    # Padding rows count on a spare counter past the tokens' (no masked atomics in interpret mode).
    counter = jnp.where(real, tokens * num_n_tiles + j, num_tokens * num_n_tiles)
    arrived = pltriton.atomic_add(arrivals_ref, (counter,), real.astype(jnp.int32))
    last = real & (arrived == local_picks * tiling.split_k - 1)
    if not interpret:  # the last arrivals' acquires before any thread reads the other programs' rows
      pltriton.debug_barrier()
    out = summed(picks, tokens, last)
    # Masked-off lanes at an out-of-range token: at a real one (padding rows read token 0) interpret mode's
    # scatter would race with that token's own store.
    store_tokens = jnp.where(last, tokens, num_tokens)
    pltriton.store(out_ref.at[store_tokens[:, None], cols[None, :]], out.astype(out_ref.dtype),
                   mask=jnp.broadcast_to(last[:, None], out.shape))

  @pl.when((i == 0) & (split == 0))
  def _():  # tokens with no local pick: no row, no arrival
    for first in range(0, num_tokens, _TOKENS_PER_STEP):
      tokens = first + jnp.arange(_TOKENS_PER_STEP, dtype=jnp.int32)
      token_ok = tokens < num_tokens
      safe_tokens = jnp.minimum(tokens, num_tokens - 1)
      picks = token_rows(safe_tokens, token_ok)
      none = token_ok & functools.reduce(jnp.logical_and, [row >= num_rows for row in picks])
      out = summed(picks, safe_tokens, none)
      # Lanes past T keep their out-of-range token (masked off): clamped, they would alias token T-1.
      pltriton.store(out_ref.at[tokens[:, None], cols[None, :]], out.astype(out_ref.dtype),
                     mask=jnp.broadcast_to(none[:, None], out.shape))


def gemm2_and_combine(tile_expert, c, c_scale, w2, w2_scale, row_weight, row_token, pair_padded_row, *,
                      tiling: GemmTiling, poison=None, out_dtype=jnp.bfloat16, rows_dtype=jnp.float32,
                      interpret=False):
  """`combine_rows(gemm2_weighted(...), pair_padded_row, poison=poison, num_splits=tiling.split_k)` as one
  kernel (the same bits).

  Args: those of `grouped_gemm.gemm2_weighted` (rows_dtype: its out_dtype) and `combine.combine_rows`, and
    row_token: [rows] int32, the schedule's token of each padded row.

  Returns:
    [T, H] out_dtype.
  """
  num_tokens, top_k = pair_padded_row.shape
  if num_tokens > MAX_TOKENS:
    raise ValueError(f"gemm2_and_combine is for T <= {MAX_TOKENS} (its M-tile 0 programs loop over every token), "
                     f"got T={num_tokens}")
  num_rows, num_local, hidden, num_m_tiles, num_n_tiles, num_k_steps = grouped_gemm.gemm2_geometry(
      tile_expert, c, c_scale, w2, tiling, rows_dtype)
  if row_token.shape != (num_rows,):
    raise ValueError(f"row_token must be [rows] = [{num_rows}], got {list(row_token.shape)}")
  arrivals = jnp.zeros((num_tokens * num_n_tiles + 1,), jnp.int32)  # + the padding rows' spare counter
  kernel = functools.partial(
      _kernel, num_m_tiles=num_m_tiles, num_n_tiles=num_n_tiles, num_k_steps=num_k_steps,
      num_local_experts=num_local, num_tokens=num_tokens, top_k=top_k, tiling=tiling, interpret=interpret)
  grid = (num_m_tiles * num_n_tiles,) + ((tiling.split_k,) if tiling.split_k > 1 else ())
  poison = poison if poison is None else poison.astype(jnp.float32)
  operands = (tile_expert, c, c_scale, w2, w2_scale, row_weight, row_token, pair_padded_row.reshape(-1), poison)
  _, out, _ = pl.pallas_call(
      kernel, grid=grid, interpret=interpret,
      input_output_aliases={sum(x is not None for x in operands): 2},  # the counters (None operands are no inputs)
      out_shape=(jax.ShapeDtypeStruct((tiling.split_k * num_rows, hidden), rows_dtype),
                 jax.ShapeDtypeStruct((num_tokens, hidden), out_dtype),
                 jax.ShapeDtypeStruct(arrivals.shape, arrivals.dtype)),
      name="moe_gemm2_combine", compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps,
                                                                         num_stages=tiling.num_stages),
  )(*operands, arrivals)
  return out
