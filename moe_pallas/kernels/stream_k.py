"""GEMM1 (+ SwiGLU + FP8 quant) as a stream-K kernel: a fixed grid that splits the used tiles' work evenly.

The grid is `stream_k` programs per SM, and program p takes the p-th equal share of the flat (item, K step)
range, items = used M-tiles x N-tiles (M-tile major). An item that falls whole into one program is computed
and stored with the SwiGLU + quant epilogue as in `grouped_gemm.gemm1_swiglu`; the pieces of an item split
between programs go to float32 slots (two a program: its first item and its last), which a second kernel
sums in program order (no float atomics: bit-identical repeats) before the same epilogue; or, with the
tiling's `fixup_in_kernel`, the program whose piece of the item arrives last (an integer atomic count per
item: zeros that the routing kernel writes, `TileSchedule.arrival_counters`, else an XLA memset) sums them,
in the same program order: the same bits, one launch fewer (the H200 table's choice at T <= 8, PERF 33).
Each piece is one K loop with dynamic bounds (Triton pipelines it); a program runs a few of them.
The shares' boundaries move with the count of used tiles, so a split item's float32 pieces are summed in
other groupings when the other tokens make more or fewer tiles: repeats of one call are bit-identical, and
a token's result in another batch agrees to float32 summation order (the GEMM1 of the H200 table at
T <= 8 only; `moe_layer_bucketed` pads to 16 tokens and more, which these T never reach).

Why: with one program per (M-tile, N-tile), how many programs run depends on the experts the tokens picked.
At T=1-7 (two experts, 32 items of 56 K steps) GEMM1 had 4 K ranges a program instead; one stream-K program
per SM reads the weights faster (H200: T=1 30.3 -> 28.6 us with its fix-up, experiments/PERF.md 24). From
8 experts up it wins or loses by 5-10 % with the experts touched, so the tables keep one program per tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moe_pallas.kernels import grouped_gemm, schedule
from moe_pallas.kernels.tiling import GemmTiling
from moe_pallas.quant import FP8_DTYPE


def _share_start(program, total, num_programs):
  """First step of a program's share of `total` steps (shares differ by at most one step)."""
  return program * total // num_programs


def _program_of_step(step, total, num_programs):
  """The program whose share holds `step` (the largest p with p * total // P <= step)."""
  return ((step + 1) * num_programs - 1) // total


def _stream_k_kernel(tile_expert_ref, row_token_ref, a_ref, a_scale_ref, w_ref, w_scale_ref, used_tiles_ref, *refs,
                     num_programs, num_n_tiles, num_k_steps, intermediate, tiling, quantize_output, interpret):
  if tiling.fixup_in_kernel:  # the zeroed arrival counters: an input, written through its aliased output
    _, out_ref, *out_scale_refs, slots_ref, arrivals_ref = refs
  else:
    out_ref, *out_scale_refs, slots_ref = refs
  program = pl.program_id(0)
  total = used_tiles_ref[0] * num_n_tiles * num_k_steps
  start = _share_start(program, total, num_programs)
  stop = _share_start(program + 1, total, num_programs)
  first_item = start // num_k_steps
  end_item = jnp.where(stop > start, (stop + num_k_steps - 1) // num_k_steps, first_item)
  bm, bn = tiling.block_m, tiling.block_n

  def piece(item, carry):
    i, j = item // num_n_tiles, item % num_n_tiles
    k_start = jnp.maximum(start - item * num_k_steps, 0)
    k_stop = jnp.minimum(stop - item * num_k_steps, num_k_steps)
    acc_up, acc_gate = grouped_gemm.gemm1_accumulate(
        tile_expert_ref, row_token_ref, a_ref, a_scale_ref, w_ref, w_scale_ref, i=i, j=j, k_start=k_start,
        num_k_steps=k_stop - k_start, intermediate=intermediate, tiling=tiling)
    whole = (k_start == 0) & (k_stop == num_k_steps)

    @pl.when(whole)
    def _():
      grouped_gemm.store_swiglu(acc_up, acc_gate, out_ref, out_scale_refs, i=i, j=j, tiling=tiling,
                                quantize_output=quantize_output)

    @pl.when(jnp.logical_not(whole))
    def _():
      slot = jnp.where(item == first_item, 2 * program, 2 * program + 1)
      rows = pl.ds(pl.multiple_of(slot * bm, bm), bm)
      slots_ref[rows, pl.ds(0, bn)] = acc_up
      slots_ref[rows, pl.ds(bn, bn)] = acc_gate
      if tiling.fixup_in_kernel:
        _arrive(item, arrivals_ref, slots_ref, out_ref, out_scale_refs, total=total, num_programs=num_programs,
                num_n_tiles=num_n_tiles, num_k_steps=num_k_steps, tiling=tiling, quantize_output=quantize_output,
                interpret=interpret)
    return carry

  jax.lax.fori_loop(first_item, end_item, piece, 0)


def _item_programs(item, total, num_programs, num_k_steps):
  """(first K step, p_lo, p_hi) of an item: programs p_lo .. p_hi hold its steps (some maybe an empty share)."""
  first_step = item * num_k_steps
  return (first_step, _program_of_step(first_step, total, num_programs),
          _program_of_step(first_step + num_k_steps - 1, total, num_programs))


def _has_share(p, total, num_programs):
  return _share_start(p + 1, total, num_programs) > _share_start(p, total, num_programs)


def _sum_pieces(slots_ref, first_step, p_lo, p_hi, *, total, num_programs, tiling):
  """A split item's up and gate sums: its pieces' slots added in program order (bit-identical repeats).
  Program p_lo (holding the item's first step) has it as its last item (slot 1) unless its share starts at
  the item (slot 0); every later one, p_lo < p <= p_hi, as its first (slot 0). Programs with an empty share
  (fewer steps than programs) wrote nothing and are skipped."""
  bm, bn = tiling.block_m, tiling.block_n

  def slot(index):
    rows = pl.ds(pl.multiple_of(index * bm, bm), bm)
    return slots_ref[rows, pl.ds(0, bn)], slots_ref[rows, pl.ds(bn, bn)]

  lo_slot = jnp.where(_share_start(p_lo, total, num_programs) == first_step, 2 * p_lo, 2 * p_lo + 1)
  acc_up, acc_gate = slot(lo_slot)

  def add_piece(p, accs):
    up, gate = slot(2 * p)
    written = _has_share(p, total, num_programs)
    return (accs[0] + jnp.where(written, up, 0.0), accs[1] + jnp.where(written, gate, 0.0))

  return jax.lax.fori_loop(p_lo + 1, p_hi + 1, add_piece, (acc_up, acc_gate))


def _arrive(item, arrivals_ref, slots_ref, out_ref, out_scale_refs, *, total, num_programs, num_n_tiles, num_k_steps,
            tiling, quantize_output, interpret):
  """`fixup_in_kernel`: this program has stored its piece of a split item; the program whose piece arrives
  last sums them all (in program order, as the fix-up kernel does) and stores the epilogue. The barrier
  makes every thread's slot stores happen before the arrival; the arrival is one acquire-release atomic at
  GPU scope (an integer count: which program sums is timing-dependent, the sum's order is not)."""
  if not interpret:  # interpret mode runs the programs one after another and has no barrier rule
    pltriton.debug_barrier()
  arrived = pltriton.atomic_add(arrivals_ref, (item,), jnp.int32(1))
  first_step, p_lo, p_hi = _item_programs(item, total, num_programs, num_k_steps)
  pieces = jax.lax.fori_loop(p_lo, p_hi + 1, lambda p, n: n + _has_share(p, total, num_programs).astype(jnp.int32),
                             jnp.int32(0))

  @pl.when(arrived == pieces - 1)
  def _():
    acc_up, acc_gate = _sum_pieces(slots_ref, first_step, p_lo, p_hi, total=total, num_programs=num_programs,
                                   tiling=tiling)
    grouped_gemm.store_swiglu(acc_up, acc_gate, out_ref, out_scale_refs, i=item // num_n_tiles,
                              j=item % num_n_tiles, tiling=tiling, quantize_output=quantize_output)


def _fixup_kernel(used_tiles_ref, slots_ref, *refs, num_programs, num_n_tiles, num_k_steps, tiling,
                  quantize_output):
  out_ref, *out_scale_refs = refs[len(refs) // 2:]  # the stream-K kernel's outputs, written in place
  # Program `item`: if the item was split between programs, the sum of its pieces in program order, then
  # the epilogue.
  item = pl.program_id(0)
  num_items = used_tiles_ref[0] * num_n_tiles
  total = jnp.maximum(num_items * num_k_steps, 1)  # no used tile (no local pick): every program exits below
  first_step, p_lo, p_hi = _item_programs(item, total, num_programs, num_k_steps)

  @pl.when((item < num_items) & (p_hi > p_lo))
  def _():
    acc_up, acc_gate = _sum_pieces(slots_ref, first_step, p_lo, p_hi, total=total, num_programs=num_programs,
                                   tiling=tiling)
    grouped_gemm.store_swiglu(acc_up, acc_gate, out_ref, out_scale_refs, i=item // num_n_tiles,
                              j=item % num_n_tiles, tiling=tiling, quantize_output=quantize_output)


def num_arrival_counters(tiling: GemmTiling, num_m_tiles: int, intermediate: int) -> int:
  """How many zeroed int32 counters `gemm1_swiglu` counts arrivals on (0 without `fixup_in_kernel`)."""
  return num_m_tiles * (intermediate // tiling.block_n) if tiling.stream_k and tiling.fixup_in_kernel else 0


def gemm1_swiglu(tile_expert, row_token, a, a_scale, w13, w13_scale, used_tiles, *, tiling: GemmTiling,
                 out_dtype=FP8_DTYPE, interpret=False, arrival_counters=None):
  """`grouped_gemm.gemm1_swiglu` (same arguments and outputs) as `tiling.stream_k` programs per SM.

  used_tiles: [] or [1] int32, the count of leading M-tiles in use (`TileSchedule.num_used_tiles`): the
  work that the programs share. Rows of tiles past it are left unwritten.
  arrival_counters: with `tiling.fixup_in_kernel`, [num_arrival_counters(...)] int32 zeros (consumed: the
  kernel writes them); None: zeros made here (an XLA memset kernel).
  """
  if tiling.stream_k < 1 or tiling.split_k != 1:
    raise ValueError(f"stream_k.gemm1_swiglu needs tiling.stream_k >= 1 and split_k = 1, got "
                     f"stream_k={tiling.stream_k}, split_k={tiling.split_k}")
  num_rows, _, two_i, num_m_tiles, num_n_tiles, num_k_steps = grouped_gemm.gemm1_geometry(tile_expert, row_token,
                                                                                         a, w13, tiling)
  intermediate = two_i // 2
  quantize_output = jnp.dtype(out_dtype) == jnp.dtype(FP8_DTYPE)
  num_programs = tiling.stream_k * schedule.num_sms(interpret)
  used = schedule.used_tiles_operand(used_tiles, num_m_tiles)
  out_shape = grouped_gemm.swiglu_out_shape(num_rows, intermediate, tiling.block_n, out_dtype)
  statics = dict(num_programs=num_programs, num_n_tiles=num_n_tiles, num_k_steps=num_k_steps,
                 tiling=tiling, quantize_output=quantize_output)
  slots_shape = jax.ShapeDtypeStruct((2 * num_programs * tiling.block_m, 2 * tiling.block_n), jnp.float32)
  # fixup_in_kernel: one arrival counter per possible item, zero at the start of every call.
  arrivals = ()
  if tiling.fixup_in_kernel:
    num_counters = num_arrival_counters(tiling, num_m_tiles, intermediate)
    if arrival_counters is None:
      arrival_counters = jnp.zeros((num_counters,), jnp.int32)
    if arrival_counters.shape != (num_counters,) or arrival_counters.dtype != jnp.int32:
      raise ValueError(f"arrival_counters must be int32[{num_counters}] (M-tiles x N-tiles), got "
                       f"{arrival_counters.dtype}{list(arrival_counters.shape)}")
    arrivals = (arrival_counters,)
  *outs, slots = pl.pallas_call(
      functools.partial(_stream_k_kernel, intermediate=intermediate, interpret=interpret, **statics),
      out_shape=(*out_shape, slots_shape, *[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrivals]),
      grid=(num_programs,), interpret=interpret, input_output_aliases={7: len(out_shape) + 1} if arrivals else {},
      name="moe_gemm1_stream_k_fp8" if quantize_output else "moe_gemm1_stream_k_bf16",
      compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
  )(tile_expert, row_token, a, a_scale, w13, w13_scale, used, *arrivals)[:len(out_shape) + 1]
  if tiling.fixup_in_kernel:
    return (outs[0], outs[1]) if quantize_output else (outs[0], None)
  outs = pl.pallas_call(
      functools.partial(_fixup_kernel, **statics),
      out_shape=out_shape, grid=(num_m_tiles * num_n_tiles,), interpret=interpret,
      input_output_aliases={2 + k: k for k in range(len(outs))},
      name="moe_gemm1_stream_k_fixup", compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
  )(used, slots, *outs)
  return (outs[0], outs[1]) if quantize_output else (outs[0], None)
