"""Routing, plan and tile schedule in one to four small Pallas kernels.

Why: at small T the ~20 small XLA kernels of `route` -> `plan_local` -> `make_tile_schedule` (sorts,
scatters, cumsums) take ~28-33 us of GPU time on the H200 whatever the token count, as much as a third of
the peer's whole GEMM path. These kernels compute the same TileSchedule with a counting sort instead of a
sort:

1. `route` (grid over blocks of tokens): SPEC.md steps 2-5 on a [tokens, E] tile in registers (sigmoid,
   biased scores, top-2 group sums, kept groups, top_k experts, normalized weights; ties to the lower
   index, as `moe_pallas.routing.route`), plus the block's pick count per local expert and each token's
   NaN poison (`routing.nan_poison`).
2. `layout` (one program): from the blocks' counts, each expert's range of padded rows (whole block_m
   tiles), where each block's picks of each expert start in it, and tile -> expert. Up to 256 blocks in
   one tile; more (T > 1024 at 4 tokens a block) in chunks of 256, a program each, as two kernels:
   `layout_sums` (each chunk's picks per expert), then `layout` (each chunk's starts from all chunks'
   sums). Measured on the H200 (results/h200_2026-11-30_s7/tune_routing15.jsonl): the routing kernels
   at T=11948 94.1 -> 53.4 us and at T=14107 110.0 -> 60.4 against one program looping over the chunks.
3. `place` (grid over blocks of tokens): each local pick's padded row = its block's start for that expert
   + its rank among the block's picks of that expert (picks in flat (token, j) order, the order of
   `plan_local`'s stable sort); writes row -> token, row -> weight and pick -> row; and the padding rows
   (token 0, weight 0) of every num_blocks-th tile from its own.

`layout_in_place=True` (the default): where the blocks' counts fit one tile (T <= 512 at 2 tokens a block,
1024 at 4), 2 and 3 run as one kernel, `layout_place`, each of whose programs sums all blocks' counts
itself and writes the tile -> expert entries of its own tiles: one kernel and one launch gap fewer a call.
Measured on the H200 (2026-11-30, results/h200_2026-11-30_s6/tune_routing.jsonl, kernel sums, the span
with the gaps in brackets): T=1 7.1 -> 5.7 us (22.9 -> 13.6), T=16 7.5 -> 5.9, T=57 7.4 -> 6.2 (30.1 ->
20.7), T=80 7.4 -> 6.1, T=901 (4 tokens a block) 12.2 -> 9.4 (26.1 -> 21.6). With one block of tokens
(T <= 2 at 2 tokens a block) route and layout_place are one program, `route_layout_place` (2026-11-30,
results/h200_2026-11-30_s7/call6_*: T=1 4.2 + 1.7 -> 4.6 us, one launch fewer).

Every output element is written by exactly one program (a row is a pick's or padding, never both): no
atomics, no barrier between programs, the same result on every run. Equal to `make_tile_schedule(plan_local(route(...)))`
field by field in interpret mode (tests/test_fused_routing.py); on the GPU the routing weights may differ
from XLA's in the last bit (the normalizing sum adds the top_k picks in another order).

Measured on the H200 (experiments/tune_routing.py, results/h200_2026-11-29/tune5_routing.jsonl; the three
kernels against XLA's): T=1 11.6 us vs 28.5, T=16 17.5 vs 28.7, T=80 20.2 vs 33.1, T=901 36.4 vs 76.8,
with 4 tokens per program and 4 warps. 16 tokens per program made `route` 30-37 us (its row reductions
over a [16, 256] tile are slow as Triton lays them out), one warp slower still. In that version `layout`
also wrote the padding rows in a one-program loop; with them in `place`'s grid (2026-11-30,
results/h200_2026-11-30/tune1_routing.jsonl) the three kernels take 7.9-8.6 us at T=1..80 with 2 tokens
per program and 13.2 at T=901 with 4 (XLA: 28.7-33.1 and 76.8).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moe_pallas.config import MoEConfig
from moe_pallas.kernels.schedule import TileSchedule, max_tiles

# Up to this many picks (T * top_k) the fused kernels are the default: measured against XLA's sort-based
# plan at T=901 (36 us vs 77) and, with `layout` in chunks, at T=11948 and 14107 on the H200 (2026-11-30,
# results/h200_2026-11-30/tune3_tiles.jsonl: 90 vs 147 us and 104 vs 161, 3 kernels vs 44). Larger T
# was not measured, and XLA's plan stays there.
MAX_FUSED_PAIRS = 16384 * 8
# `layout` sums the blocks' counts as one [blocks, E_local] tile up to this many blocks (256 at T=1024 with
# 4 tokens a block), in chunks of it above.
_BLOCKS_PER_CHUNK = 256

_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)

# From this T, `route` runs 2 tokens a program on one warp (its row reductions then stay within the warp:
# shuffles, no shared-memory round trips), the other kernels 2 tokens a block on num_warps. Measured on the
# H200 (2026-11-30, results/h200_2026-11-30_s9/tune_routing26.jsonl, the kernels at 4 warps, 4 tokens:
# route 40.4 us at T=11948, 46.6 at T=14107; 1 warp, 2 tokens: 32.7 and 38.2, with layout + place then
# 4.1 + 7.7 and 4.3 + 8.8 us at 4 warps against 4.7 + 6.3 and 4.7 + 7.2; the kernels' sum
# 53.3 -> ~46.4 and 60.5 -> ~53.3). Below, where layout folds into place (T <= 1024), not measured.
_ONE_WARP_ROUTE_FROM = 2048

# Up to this T, route + layout + place run as one program (one block of T tokens, padded to a power of
# two) by default: one launch instead of two. Measured on the H200 at 2 (one block of 2 tokens at T <= 2)
# against 8 (experiments/one_program_routing_probe.py, 2026-12-01, results/h200_2026-12-01_s16/call4, PERF
# 66): at T=7 the one program takes 6.8 us against the two kernels' 3.6 + 1.7, and the launch it saves was
# not measurable on the host (80-126 us a call either way); pipelined 55.7/60.8/56.0 against 55.0/54.1/53.1.
ONE_PROGRAM_MAX_TOKENS = 2


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def supports(config: MoEConfig) -> bool:
  """Whether a token's E scores and a group's experts make Triton tiles (power-of-two sizes)."""
  return all(n & (n - 1) == 0 for n in (config.num_experts, config.n_group, config.top_k))


def _route_kernel(logits_ref, bias_ref, factor_ref, offset_ref, ids_ref, weights_ref, counts_ref, poison_ref, *,
                  num_tokens, config: MoEConfig, num_local, lanes, tokens_per_block):
  bt, k = tokens_per_block, config.top_k
  num_experts, num_groups, per_group = config.num_experts, config.n_group, config.experts_per_group
  tokens = pl.program_id(0) * bt + jnp.arange(bt, dtype=jnp.int32)
  token_ok = tokens < num_tokens
  experts = jnp.arange(num_experts, dtype=jnp.int32)
  rows = jnp.minimum(tokens, num_tokens - 1)[:, None]
  logits = pltriton.load(logits_ref.at[rows, experts[None, :]])
  bias = bias_ref[...].astype(jnp.float32)
  scores = jax.nn.sigmoid(logits)
  biased = scores + bias[None, :]
  # routing.nan_poison, from the tile already in registers (no extra pass over the logits): NaN for a token
  # whose logits hold a NaN, for every token if the bias does, else 0.
  has_nan = (jnp.max(jnp.isnan(logits).astype(jnp.int32), axis=1) + jnp.max(jnp.isnan(bias).astype(jnp.int32))) > 0
  pltriton.store(poison_ref.at[tokens], jnp.where(has_nan, jnp.nan, 0.0).astype(jnp.float32), mask=token_ok)

  # Group score: the sum of the group's two largest biased scores (SPEC.md step 3).
  grouped = biased.reshape(bt, num_groups, per_group)
  in_group = jnp.arange(per_group, dtype=jnp.int32)[None, None, :]
  first = jnp.argmax(grouped, axis=2).astype(jnp.int32)
  second = jnp.max(jnp.where(in_group == first[:, :, None], -jnp.inf, grouped), axis=2)
  group_scores = jnp.max(grouped, axis=2) + second
  # Keep the topk_group best groups: a group is kept when fewer than topk_group groups beat it (a larger
  # score, or an equal one at a lower index).
  g = jnp.arange(num_groups, dtype=jnp.int32)
  mine, other = group_scores[:, :, None], group_scores[:, None, :]
  beats = (other > mine) | ((other == mine) & (g[None, None, :] < g[None, :, None]))
  kept = jnp.sum(beats.astype(jnp.int32), axis=2) < config.topk_group
  keep = jnp.broadcast_to(kept[:, :, None], (bt, num_groups, per_group)).reshape(bt, num_experts)
  masked = jnp.where(keep, biased, _MASKED_SCORE)

  positions = experts[None, :]
  picks = []
  for _ in range(k):
    pick = jnp.argmax(masked, axis=1).astype(jnp.int32)  # the lowest index among equal maxima
    picks.append(pick)
    masked = jnp.where(positions == pick[:, None], -jnp.inf, masked)
  # [bt, k] tiles from k columns (Triton's stack takes two operands only).
  column = jnp.arange(k, dtype=jnp.int32)[None, :]
  ids = functools.reduce(jnp.add, [jnp.where(column == j, pick[:, None], 0) for j, pick in enumerate(picks)])
  # The picks' scores read back from the logits (an L1 hit: this program just loaded them) and put through
  # the same sigmoid, the same bits as the tile's `scores`: one load instead of a row reduction a pick
  # (H200, experiments/PERF.md 50: route 4.2 -> 3.5 us at T=7-80, 32.7 -> 22.9 at T=11948).
  picked = jax.nn.sigmoid(pltriton.load(logits_ref.at[rows, ids]))
  weights = picked / (jnp.sum(picked, axis=1, keepdims=True) + 1e-20) * factor_ref[0]
  flat = tokens[:, None] * k + jnp.arange(k, dtype=jnp.int32)[None, :]
  store_ok = jnp.broadcast_to(token_ok[:, None], (bt, k))
  pltriton.store(ids_ref.at[flat], ids, mask=store_ok)
  pltriton.store(weights_ref.at[flat], weights, mask=store_ok)

  # This block's picks of each local expert (padding tokens count nothing).
  local = (ids - offset_ref[0]).reshape(bt * k)
  is_local = (local >= 0) & (local < num_local) & jnp.broadcast_to(token_ok[:, None], (bt, k)).reshape(bt * k)
  one_hot = (local[:, None] == jnp.arange(lanes, dtype=jnp.int32)[None, :]) & is_local[:, None]
  counts_ref[pl.program_id(0), :] = jnp.sum(one_hot.astype(jnp.int32), axis=0)


def _expert_ranges(totals, *, block_m, lanes):
  """Each expert's padded rows (whole block_m tiles, experts in order): (padded, start, end) [lanes]."""
  experts = jnp.arange(lanes, dtype=jnp.int32)
  padded = (totals + block_m - 1) // block_m * block_m
  earlier = experts[None, :] < experts[:, None]  # [e, e']: e' comes before e
  padded_start = jnp.sum(jnp.where(earlier, padded[None, :], 0), axis=1)
  return padded, padded_start, padded_start + padded


def _tile_experts(tiles, padded_end, *, block_m, num_local, lanes):
  """Tile -> expert: the number of experts whose padded range ends at or before the tile's first row
  (num_local for the unused tiles at the end)."""
  experts = jnp.arange(lanes, dtype=jnp.int32)
  ended = (padded_end[None, :] <= (tiles * block_m)[:, None]) & (experts[None, :] < num_local)
  return jnp.sum(ended.astype(jnp.int32), axis=1)


def _chunk_counts(counts_ref, chunk, *, num_blocks, lanes, blocks_per_chunk):
  """(blocks, in_range [blocks, 1], counts [blocks_per_chunk, lanes]) of one chunk of blocks: zeros past the
  last block."""
  blocks = chunk * blocks_per_chunk + jnp.arange(blocks_per_chunk, dtype=jnp.int32)
  in_range = (blocks < num_blocks)[:, None]
  experts = jnp.arange(lanes, dtype=jnp.int32)
  return blocks, in_range, pltriton.load(counts_ref.at[blocks[:, None], experts[None, :]], mask=in_range, other=0)


def _store_block_starts(block_start_ref, blocks, in_range, counts, first):
  """Where each block's picks of each expert start: `first` (the expert's start + the picks of the blocks
  before these) + the earlier blocks' picks among these."""
  experts = jnp.arange(counts.shape[1], dtype=jnp.int32)
  starts = first[None, :] + jnp.cumsum(counts, axis=0) - counts
  pltriton.store(block_start_ref.at[blocks[:, None], experts[None, :]], starts,
                 mask=jnp.broadcast_to(in_range, starts.shape))


def _store_totals(expert_rows_ref, used_tiles_ref, padded_start, totals, padded, *, block_m):
  expert_rows_ref[0, :] = padded_start
  expert_rows_ref[1, :] = totals
  used_tiles_ref[...] = jnp.broadcast_to(jnp.sum(padded) // block_m, (1,))


def _layout_kernel(counts_ref, tile_expert_ref, block_start_ref, expert_rows_ref, used_tiles_ref, *, num_blocks,
                   num_local, lanes, block_m, num_tiles, tiles_per_step, blocks_per_chunk):
  """One program: the layout of up to one chunk of blocks (T <= 1024 at 4 tokens a block), the counts held
  in registers (more blocks: `_chunk_sums_kernel` + `_chunk_layout_kernel`, a program per chunk)."""
  _, _, counts = _chunk_counts(counts_ref, 0, num_blocks=num_blocks, lanes=lanes, blocks_per_chunk=blocks_per_chunk)
  totals = jnp.sum(counts, axis=0)
  padded, padded_start, padded_end = _expert_ranges(totals, block_m=block_m, lanes=lanes)
  # Where each block's picks of each expert start: the expert's start + the earlier blocks' picks.
  block_start_ref[...] = padded_start[None, :] + jnp.cumsum(counts, axis=0) - counts
  _store_totals(expert_rows_ref, used_tiles_ref, padded_start, totals, padded, block_m=block_m)

  def tiles_step(step, carry):
    tiles = step * tiles_per_step + jnp.arange(tiles_per_step, dtype=jnp.int32)
    pltriton.store(tile_expert_ref.at[tiles],
                   _tile_experts(tiles, padded_end, block_m=block_m, num_local=num_local, lanes=lanes),
                   mask=tiles < num_tiles)
    return carry
  jax.lax.fori_loop(0, pl.cdiv(num_tiles, tiles_per_step), tiles_step, 0)


def _chunk_sums_kernel(counts_ref, sums_ref, *, num_blocks, lanes, blocks_per_chunk):
  """Program c: the picks of each local expert in chunk c's blocks (the parallel layout's first pass)."""
  chunk = pl.program_id(0)
  _, _, counts = _chunk_counts(counts_ref, chunk, num_blocks=num_blocks, lanes=lanes,
                               blocks_per_chunk=blocks_per_chunk)
  sums_ref[chunk, :] = jnp.sum(counts, axis=0)


def _chunk_layout_kernel(counts_ref, sums_ref, tile_expert_ref, block_start_ref, expert_rows_ref, used_tiles_ref, *,
                         num_blocks, num_chunks, num_local, lanes, block_m, num_tiles, tiles_per_program,
                         blocks_per_chunk):
  """Program c: `_layout_kernel`'s outputs for chunk c's blocks and its share of the tiles, from all chunks'
  sums (a [chunks, lanes] tile: the totals, and the picks of the chunks before c)."""
  chunk = pl.program_id(0)
  experts = jnp.arange(lanes, dtype=jnp.int32)
  chunks = jnp.arange(_next_pow2(num_chunks), dtype=jnp.int32)
  sums = pltriton.load(sums_ref.at[jnp.minimum(chunks, num_chunks - 1)[:, None], experts[None, :]],
                       mask=(chunks < num_chunks)[:, None], other=0)
  totals = jnp.sum(sums, axis=0)
  earlier_chunks = jnp.sum(jnp.where((chunks < chunk)[:, None], sums, 0), axis=0)
  padded, padded_start, padded_end = _expert_ranges(totals, block_m=block_m, lanes=lanes)
  blocks, in_range, counts = _chunk_counts(counts_ref, chunk, num_blocks=num_blocks, lanes=lanes,
                                           blocks_per_chunk=blocks_per_chunk)
  _store_block_starts(block_start_ref, blocks, in_range, counts, padded_start + earlier_chunks)
  tiles = chunk * tiles_per_program + jnp.arange(tiles_per_program, dtype=jnp.int32)
  pltriton.store(tile_expert_ref.at[tiles],
                 _tile_experts(tiles, padded_end, block_m=block_m, num_local=num_local, lanes=lanes),
                 mask=tiles < num_tiles)

  pl.when(chunk == 0)(lambda: _store_totals(expert_rows_ref, used_tiles_ref, padded_start, totals, padded,
                                            block_m=block_m))


def _place_picks(ids_ref, weights_ref, offset_ref, row_token_ref, row_weight_ref, pair_row_ref, start, *, num_pairs,
                 top_k, num_local, lanes, num_rows, tokens_per_block):
  """This block's picks: each local pick's padded row = `start` (the block's first row of each expert) + its
  rank among the block's picks of that expert (picks in flat (token, j) order, the order of `plan_local`'s
  stable sort); writes row -> token, row -> weight and pick -> row."""
  experts = jnp.arange(lanes, dtype=jnp.int32)
  block_pairs = tokens_per_block * top_k
  pairs = pl.program_id(0) * block_pairs + jnp.arange(block_pairs, dtype=jnp.int32)
  pair_ok = pairs < num_pairs
  safe_pairs = jnp.minimum(pairs, num_pairs - 1)
  local = pltriton.load(ids_ref.at[safe_pairs]) - offset_ref[0]
  is_local = pair_ok & (local >= 0) & (local < num_local)
  one_hot = ((local[:, None] == experts[None, :]) & is_local[:, None]).astype(jnp.int32)
  before = jnp.cumsum(one_hot, axis=0) - one_hot  # earlier picks of the same expert in this block
  row = jnp.where(is_local, jnp.sum(one_hot * (before + start[None, :]), axis=1), num_rows)
  pltriton.store(pair_row_ref.at[pairs], row, mask=pair_ok)
  # Masked-off lanes keep their out-of-range rows: Triton stores nothing there, and interpret mode drops them.
  pltriton.store(row_token_ref.at[row], pairs // top_k, mask=is_local)
  pltriton.store(row_weight_ref.at[row], pltriton.load(weights_ref.at[safe_pairs]), mask=is_local)


def _pad_rows(row_token_ref, row_weight_ref, tiles, tile_ok, expert, expert_start, expert_total, *, block_m,
              num_local):
  """Padding rows (past an expert's picks, or in unused tiles) of `tiles` read token 0 with weight 0."""
  rows = tiles[:, None] * block_m + jnp.arange(block_m, dtype=jnp.int32)[None, :]
  past_picks = rows - expert_start[:, None] >= expert_total[:, None]
  padding = tile_ok[:, None] & ((expert >= num_local)[:, None] | past_picks)
  pltriton.store(row_token_ref.at[rows], jnp.zeros_like(rows), mask=padding)
  pltriton.store(row_weight_ref.at[rows], jnp.zeros(rows.shape, jnp.float32), mask=padding)


def _select(expert, values, lanes):
  """values[expert] per tile, from a [lanes] vector in registers."""
  mine = jnp.arange(lanes, dtype=jnp.int32)[None, :] == expert[:, None]
  return jnp.sum(jnp.where(mine, values[None, :], 0), axis=1)


def _place_kernel(ids_ref, weights_ref, offset_ref, block_start_ref, tile_expert_ref, expert_rows_ref,
                  row_token_ref, row_weight_ref, pair_row_ref, *, num_pairs, top_k, num_local, lanes, block_m,
                  num_tiles, tokens_per_block, tiles_per_program):
  block = pl.program_id(0)
  _place_picks(ids_ref, weights_ref, offset_ref, row_token_ref, row_weight_ref, pair_row_ref,
               block_start_ref[block, :], num_pairs=num_pairs, top_k=top_k, num_local=num_local, lanes=lanes,
               num_rows=num_tiles * block_m, tokens_per_block=tokens_per_block)
  # The padding rows of tiles block, block + num_blocks, ...; the real rows are the picks' (above).
  tiles = block + jnp.arange(tiles_per_program, dtype=jnp.int32) * pl.num_programs(0)
  tile_ok = tiles < num_tiles
  expert = pltriton.load(tile_expert_ref.at[jnp.minimum(tiles, num_tiles - 1)], mask=tile_ok, other=num_local)
  _pad_rows(row_token_ref, row_weight_ref, tiles, tile_ok, expert, _select(expert, expert_rows_ref[0, :], lanes),
            _select(expert, expert_rows_ref[1, :], lanes), block_m=block_m, num_local=num_local)


def _layout_and_place_kernel(counts_ref, ids_ref, weights_ref, offset_ref, tile_expert_ref, used_tiles_ref,
                             row_token_ref, row_weight_ref, pair_row_ref, *zeros_ref, num_blocks, num_pairs, top_k,
                             num_local, lanes, block_m, num_tiles, tokens_per_block, tiles_per_program,
                             blocks_per_chunk, zeros_per_program):
  """`layout` and `place` in one kernel, for calls whose blocks' counts fit one tile (num_blocks <=
  blocks_per_chunk): every program sums all blocks' counts itself (at most a [256, lanes] tile) instead of
  reading a layout kernel's results, so the call has one kernel and one launch gap fewer. With `zeros_ref`,
  each program also zeroes its share of it (`route_and_schedule`'s num_zeros)."""
  block = pl.program_id(0)
  if zeros_ref:
    (zeros_ref,) = zeros_ref
    slots = block * zeros_per_program + jnp.arange(zeros_per_program, dtype=jnp.int32)
    pltriton.store(zeros_ref.at[slots], jnp.zeros_like(slots), mask=slots < zeros_ref.shape[0])
  blocks, _, counts = _chunk_counts(counts_ref, 0, num_blocks=num_blocks, lanes=lanes,
                                    blocks_per_chunk=blocks_per_chunk)
  totals = jnp.sum(counts, axis=0)
  padded, padded_start, padded_end = _expert_ranges(totals, block_m=block_m, lanes=lanes)
  start = padded_start + jnp.sum(jnp.where((blocks < block)[:, None], counts, 0), axis=0)
  _place_picks(ids_ref, weights_ref, offset_ref, row_token_ref, row_weight_ref, pair_row_ref, start,
               num_pairs=num_pairs, top_k=top_k, num_local=num_local, lanes=lanes, num_rows=num_tiles * block_m,
               tokens_per_block=tokens_per_block)
  # Tiles block, block + num_blocks, ...: their expert, and their padding rows.
  tiles = block + jnp.arange(tiles_per_program, dtype=jnp.int32) * pl.num_programs(0)
  tile_ok = tiles < num_tiles
  expert = _tile_experts(tiles, padded_end, block_m=block_m, num_local=num_local, lanes=lanes)
  pltriton.store(tile_expert_ref.at[tiles], expert, mask=tile_ok)
  _pad_rows(row_token_ref, row_weight_ref, tiles, tile_ok, expert, _select(expert, padded_start, lanes),
            _select(expert, totals, lanes), block_m=block_m, num_local=num_local)

  @pl.when(block == 0)
  def _():
    used_tiles_ref[...] = jnp.broadcast_to(jnp.sum(padded) // block_m, (1,))


def _route_layout_place_kernel(logits_ref, bias_ref, factor_ref, offset_ref, ids_ref, weights_ref, counts_ref,
                               poison_ref, tile_expert_ref, used_tiles_ref, row_token_ref, row_weight_ref,
                               pair_row_ref, *zeros_ref, route, layout_place, interpret):
  """`route` and `layout_place` as one program, for calls of one block of tokens (T <= tokens_per_block):
  the picks, weights and counts that route stores are read back by layout_place, by other threads of the
  program, after a barrier (bar.sync: the program's global stores before it are visible to all its threads
  after it). Interpret mode runs the program in order and has no barrier rule."""
  route(logits_ref, bias_ref, factor_ref, offset_ref, ids_ref, weights_ref, counts_ref, poison_ref)
  if not interpret:
    pltriton.debug_barrier()
  layout_place(counts_ref, ids_ref, weights_ref, offset_ref, tile_expert_ref, used_tiles_ref, row_token_ref,
               row_weight_ref, pair_row_ref, *zeros_ref)


def route_and_schedule(routing_logits, routing_bias, routed_scaling_factor, local_expert_offset, *,
                       config: MoEConfig, num_local_experts: int, block_m: int, interpret=False,
                       tokens_per_block: int | None = None, num_warps: int = 4, route_warps: int | None = None,
                       tiles_per_step: int = 256, layout_in_place: bool = True, num_zeros: int = 0):
  """`route` -> `plan_local` -> `make_tile_schedule(block_m)` as two kernels (one for one block of tokens, four
  past T=512-1024).

  Args (tuning, see experiments/tune_routing.py): tokens_per_block (route and place programs, a power of
  two; None: T's next power of two up to ONE_PROGRAM_MAX_TOKENS (one program), 2 up to T=128 and from
  T=2048, else 4), num_warps (all kernels), route_warps (the `route`
  kernel's own, where it is a kernel of its own; None: num_warps, or 1 from T=2048 at 2 tokens a block),
  tiles_per_step (layout's tile loop, a power of two), layout_in_place (`layout` folded into `place` where
  the blocks' counts fit one tile, T <= 512 or 1024 by tokens_per_block: every place program sums them
  itself; one kernel fewer, 1.3-2.8 us less GPU time a call on the H200; with one block of tokens, route
  and layout_place as one program; False: the three kernels up to one tile of blocks). Past one tile of
  blocks, `layout` is two kernels with a program per chunk of 256 blocks, the chunks' sums then each
  chunk's starts (measured on the H200, experiments/results/h200_2026-11-30_s7/tune_routing15.jsonl: the
  routing kernels at T=11948 94.1 -> 53.4 us, at T=14107 110.0 -> 60.4, against one program looping over
  the chunks twice).
  num_zeros: the schedule's `arrival_counters`, that many int32 zeros for the GEMM1 that counts arrivals
  (`GemmTiling.fixup_in_kernel`); written by `layout_place` where it runs (so that no memset kernel runs
  a call: PERF 33), else by XLA.

  Returns:
    (TileSchedule, topk_ids [T, top_k] int32, topk_weights [T, top_k] float32, poison [T] float32: equal
    to `routing.nan_poison(routing_logits, routing_bias)`).

  Raises:
    NotImplementedError: a geometry whose tiles are not powers of two (see `supports`).
  """
  num_tokens, num_experts = routing_logits.shape
  if num_tokens == 0:
    raise ValueError("route_and_schedule needs T >= 1 (the layer returns its empty output before routing)")
  if not supports(config) or num_experts != config.num_experts:
    raise NotImplementedError(f"the fused routing kernels need power-of-two E, n_group and top_k, got "
                              f"E={num_experts}, n_group={config.n_group}, top_k={config.top_k}")
  if tokens_per_block is None:
    # Measured on H200 (tune_routing.py, 2026-11-30, experiments/results/h200_2026-11-30/): 2 tokens per
    # program take the three kernels from 9.2-9.7 to 7.9-8.6 us at T=1..80; at T=901, 4 do (13.2 vs 15.2).
    if num_tokens <= ONE_PROGRAM_MAX_TOKENS:
      tokens_per_block = max(2, _next_pow2(num_tokens))
    else:
      tokens_per_block = 2 if num_tokens <= 128 or num_tokens >= _ONE_WARP_ROUTE_FROM else 4
  if route_warps is None:
    route_warps = 1 if num_tokens >= _ONE_WARP_ROUTE_FROM and tokens_per_block <= 2 else num_warps
  top_k = config.top_k
  num_pairs = num_tokens * top_k
  num_blocks = pl.cdiv(num_tokens, tokens_per_block)
  lanes = _next_pow2(num_local_experts)
  num_tiles = max_tiles(num_pairs, num_local_experts, block_m)
  num_rows = num_tiles * block_m
  params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
  offset = jnp.reshape(jnp.asarray(local_expert_offset, jnp.int32), (1,))

  # The layout program holds up to _BLOCKS_PER_CHUNK blocks' counts as one tile, more in chunks of that.
  blocks_per_chunk = min(_next_pow2(num_blocks), _BLOCKS_PER_CHUNK)
  counts_shape = (pl.cdiv(num_blocks, blocks_per_chunk) * blocks_per_chunk, lanes)
  route = functools.partial(_route_kernel, num_tokens=num_tokens, config=config, num_local=num_local_experts,
                            lanes=lanes, tokens_per_block=tokens_per_block)
  route_outputs = (jax.ShapeDtypeStruct((num_pairs,), jnp.int32), jax.ShapeDtypeStruct((num_pairs,), jnp.float32),
                   jax.ShapeDtypeStruct(counts_shape, jnp.int32), jax.ShapeDtypeStruct((num_tokens,), jnp.float32))
  route_inputs = (routing_logits.astype(jnp.float32), routing_bias,
                  jnp.reshape(jnp.asarray(routed_scaling_factor, jnp.float32), (1,)), offset)
  pick_outputs = (jax.ShapeDtypeStruct((num_rows,), jnp.int32), jax.ShapeDtypeStruct((num_rows,), jnp.float32),
                  jax.ShapeDtypeStruct((num_pairs,), jnp.int32))
  tiles_per_program = _next_pow2(pl.cdiv(num_tiles, num_blocks))
  layout_place = functools.partial(_layout_and_place_kernel, num_blocks=num_blocks, num_pairs=num_pairs,
                                   top_k=top_k, num_local=num_local_experts, lanes=lanes, block_m=block_m,
                                   num_tiles=num_tiles, tokens_per_block=tokens_per_block,
                                   tiles_per_program=tiles_per_program, blocks_per_chunk=blocks_per_chunk,
                                   zeros_per_program=_next_pow2(pl.cdiv(max(num_zeros, 1), num_blocks)))
  zeros_output = (jax.ShapeDtypeStruct((num_zeros,), jnp.int32),) if num_zeros else ()
  layout_place_outputs = (jax.ShapeDtypeStruct((num_tiles,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32),
                          *pick_outputs, *zeros_output)
  if layout_in_place and num_blocks == 1:  # T <= tokens_per_block: one kernel
    ids, weights, _, poison, tile_expert, used_tiles, row_token, row_weight, pair_row, *zeros = pl.pallas_call(
        functools.partial(_route_layout_place_kernel, route=route, layout_place=layout_place, interpret=interpret),
        grid=(1,), interpret=interpret, name="moe_route_layout_place", compiler_params=params,
        out_shape=(*route_outputs, *layout_place_outputs),
    )(*route_inputs)
    return _result(tile_expert, row_token, row_weight, pair_row, used_tiles, ids, weights, poison, num_tokens,
                   top_k, zeros)

  ids, weights, counts, poison = pl.pallas_call(
      route, grid=(num_blocks,), interpret=interpret, name="moe_route",
      compiler_params=pltriton.CompilerParams(num_warps=route_warps, num_stages=1),
      out_shape=route_outputs,
  )(*route_inputs)
  if layout_in_place and num_blocks <= blocks_per_chunk:
    tile_expert, used_tiles, row_token, row_weight, pair_row, *zeros = pl.pallas_call(
        layout_place, grid=(num_blocks,), interpret=interpret, name="moe_layout_place", compiler_params=params,
        out_shape=layout_place_outputs,
    )(counts, ids, weights, offset)
    return _result(tile_expert, row_token, row_weight, pair_row, used_tiles, ids, weights, poison, num_tokens,
                   top_k, zeros)

  layout_outputs = (jax.ShapeDtypeStruct((num_tiles,), jnp.int32), jax.ShapeDtypeStruct(counts_shape, jnp.int32),
                    jax.ShapeDtypeStruct((2, lanes), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
  num_chunks = counts_shape[0] // blocks_per_chunk
  if num_chunks > 1:
    sums = pl.pallas_call(
        functools.partial(_chunk_sums_kernel, num_blocks=num_blocks, lanes=lanes, blocks_per_chunk=blocks_per_chunk),
        grid=(num_chunks,), interpret=interpret, name="moe_layout_sums", compiler_params=params,
        out_shape=jax.ShapeDtypeStruct((num_chunks, lanes), jnp.int32),
    )(counts)
    tile_expert, block_start, expert_rows, used_tiles = pl.pallas_call(
        functools.partial(_chunk_layout_kernel, num_blocks=num_blocks, num_chunks=num_chunks,
                          num_local=num_local_experts, lanes=lanes, block_m=block_m, num_tiles=num_tiles,
                          tiles_per_program=_next_pow2(pl.cdiv(num_tiles, num_chunks)),
                          blocks_per_chunk=blocks_per_chunk),
        grid=(num_chunks,), interpret=interpret, name="moe_layout", compiler_params=params,
        out_shape=layout_outputs,
    )(counts, sums)
  else:
    tile_expert, block_start, expert_rows, used_tiles = pl.pallas_call(
        functools.partial(_layout_kernel, num_blocks=num_blocks, num_local=num_local_experts, lanes=lanes,
                          block_m=block_m, num_tiles=num_tiles, tiles_per_step=tiles_per_step,
                          blocks_per_chunk=blocks_per_chunk),
        grid=(1,), interpret=interpret, name="moe_layout", compiler_params=params, out_shape=layout_outputs,
    )(counts)

  row_token, row_weight, pair_row = pl.pallas_call(
      functools.partial(_place_kernel, num_pairs=num_pairs, top_k=top_k, num_local=num_local_experts, lanes=lanes,
                        block_m=block_m, num_tiles=num_tiles, tokens_per_block=tokens_per_block,
                        tiles_per_program=tiles_per_program),
      grid=(num_blocks,), interpret=interpret, name="moe_place", compiler_params=params, out_shape=pick_outputs,
  )(ids, weights, offset, block_start, tile_expert, expert_rows)
  zeros = [jnp.zeros((num_zeros,), jnp.int32)] if num_zeros else []
  return _result(tile_expert, row_token, row_weight, pair_row, used_tiles, ids, weights, poison, num_tokens, top_k,
                 zeros)


def _result(tile_expert, row_token, row_weight, pair_row, used_tiles, ids, weights, poison, num_tokens, top_k, zeros):
  schedule = TileSchedule(tile_expert=tile_expert, row_token=row_token, row_weight=row_weight,
                          pair_padded_row=pair_row.reshape(num_tokens, top_k),
                          num_used_tiles=used_tiles.reshape(()), arrival_counters=zeros[0] if zeros else None)
  return schedule, ids.reshape(num_tokens, top_k), weights.reshape(num_tokens, top_k), poison
