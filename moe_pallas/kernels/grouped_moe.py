"""The layer's expert computation on the kernels: the `"triton"` implementation.

tile schedule -> GEMM1 (rows gathered in its loads) + SwiGLU + FP8 quant -> GEMM2 x routing weight ->
combine (each token's rows summed in float32, rounded once). All of it traces into the caller's jitted
program. Where the tiling's `gemm_kernels` says Mosaic (the H200's table at large T), both GEMMs are the
Mosaic GPU kernels of `mosaic_gemm` instead: rows gathered -> GEMM1 with SwiGLU + FP8 quant (in its
epilogue, or as a kernel after a [rows, 2I] float32 GEMM1) -> GEMM2 (the routing weight folded into its row
scales) -> combine. Two entries:

- `moe_layer_triton`: the whole layer from the router logits. Up to `fused_routing.MAX_FUSED_PAIRS`
  picks (T <= 16384 at DeepSeek-V3's top-8), routing + plan + schedule run as small Pallas kernels: one
  at T <= 2, two up to T=512-1024, four above (five or six kernels per call in all with the Triton
  GEMMs; with the Mosaic ones also the row gather, and three small XLA ops of scale layout and routing
  weight unless the tiling's `scales_in_gather` and `weights_in_gemm2` move them into the kernels); above
  16384 picks, as XLA's routing and sort-based plan (~40 small kernels, a small share of a large call).
- `apply_local_experts_triton`: from a RoutingPlan (the public `apply_local_experts`, used by sharded
  callers that route once for all ranks).
"""

from __future__ import annotations

import jax.numpy as jnp

from moe_pallas import weight_layout
from moe_pallas.config import MoEConfig
from moe_pallas.kernels import combine, fused_routing, grouped_gemm, mosaic_gemm, stream_k, triton_internals
from moe_pallas.kernels.schedule import TileSchedule, make_tile_schedule, max_tiles
from moe_pallas.kernels.tiling import MoETiling, default_tiling
from moe_pallas.routing import RoutingPlan, grouped_topk, nan_poison, sort_local_pairs


def _tiling_for(tiling, num_tokens, top_k, num_local, hidden, intermediate, intermediate_dtype) -> MoETiling:
  quantized = jnp.dtype(intermediate_dtype) == jnp.dtype(jnp.float8_e4m3fn)
  why_not_mosaic = _why_not_mosaic(hidden, intermediate, quantized)
  if tiling is None:
    tiling = default_tiling(num_tokens, top_k, num_local, hidden=hidden, intermediate=intermediate)
    if tiling.mosaic and why_not_mosaic:  # the table's choice where the Mosaic kernels cannot run
      tiling = tiling.with_triton_gemms()
  elif tiling.mosaic and why_not_mosaic:
    raise ValueError(f"tiling.gemm_kernels={tiling.gemm_kernels!r}: {why_not_mosaic}")
  tiling.check_intermediate(quantized)
  return tiling


def _why_not_mosaic(hidden: int, intermediate: int, quantized: bool) -> str | None:
  if not quantized:
    return "the Mosaic GEMM2 takes an FP8 intermediate only (intermediate_dtype=float8_e4m3fn)"
  return (mosaic_gemm.supports(2 * intermediate, hidden, mosaic_gemm.BLOCK_M)
          or mosaic_gemm.supports(hidden, intermediate, mosaic_gemm.BLOCK_M))


# The fused Mosaic GEMM1 of each `gemm_kernels` that has one: how its two compute warpgroups share an item.
_FUSED_WARPGROUPS = {"mosaic_fused_swiglu": "on_up", "mosaic_fused_swiglu_split": "split",
                     "mosaic_fused_swiglu_paired": "paired"}


def _rows_dtype(tiling: MoETiling):
  """GEMM2's weighted rows, as the combine reads them."""
  return jnp.bfloat16 if tiling.bf16_rows else jnp.float32


def _experts_mosaic(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
                    gemm2_weights_scale, schedule: TileSchedule, *, tiling: MoETiling, out_dtype, interpret,
                    poison=None):
  """`tiling.mosaic`: gather -> Mosaic GEMM1 [rows, 2I] float32 -> SwiGLU + quant -> Mosaic GEMM2 ->
  combine ("mosaic_fused_swiglu" and its "_split" and "_paired" variants: GEMM1 with SwiGLU + quant in its
  epilogue). The TMA-fed GEMM reads whole row tiles, so the rows are gathered first (tiles in use only)."""
  num_local = gemm1_weights.shape[0]
  weight_scales = (gemm1_weights_scale, gemm2_weights_scale)
  rows, rows_scale, *scale_rows = grouped_gemm.gather_rows(
      schedule.tile_expert, schedule.row_token, hidden_states, hidden_states_scale, block_m=tiling.block_m,
      num_local_experts=num_local, interpret=interpret,
      transposed_scales=[(w, mosaic_gemm.weight_scale_cols(w.shape)) for w in weight_scales]
      if tiling.scales_in_gather else ())
  gemm1_scale_rows, gemm2_scale_rows = scale_rows or (None, None)  # None: each GEMM lays its scales out
  if tiling.gemm_kernels in _FUSED_WARPGROUPS:  # SwiGLU + quant in GEMM1's epilogue
    swiglu, swiglu_scale = mosaic_gemm.grouped_fp8_gemm_swiglu(
        schedule.tile_expert, rows, rows_scale, gemm1_weights, gemm1_weights_scale,
        used_tiles=schedule.num_used_tiles, warpgroups=_FUSED_WARPGROUPS[tiling.gemm_kernels], interpret=interpret,
        w_scale_rows=gemm1_scale_rows, chain_items=tiling.chain_items, group_m=tiling.gemm1.group_m)
  else:
    gate_up = mosaic_gemm.grouped_fp8_gemm(schedule.tile_expert, rows, rows_scale, gemm1_weights, gemm1_weights_scale,
                                           used_tiles=schedule.num_used_tiles, name="moe_gemm1_mosaic",
                                           interpret=interpret, w_scale_rows=gemm1_scale_rows,
                                           chain_items=tiling.chain_items, group_m=tiling.gemm1.group_m)
    swiglu, swiglu_scale = grouped_gemm.swiglu_of_partials(schedule.tile_expert, gate_up,
                                                           num_local_experts=num_local, tiling=tiling.gemm1,
                                                           interpret=interpret)
  # Each row's routing weight joins its activation scales: a per-row factor of every K step, so GEMM2's
  # output rows come out weighted, as the Triton GEMM2's do. (Rows of unused tiles hold no values.)
  # (`weights_in_gemm2`: the same product, formed in the kernel from the [rows] weights.)
  in_kernel = tiling.weights_in_gemm2
  row_scale = swiglu_scale if in_kernel else swiglu_scale * schedule.row_weight[None, :]
  weighted_rows = mosaic_gemm.grouped_fp8_gemm(schedule.tile_expert, swiglu, row_scale, gemm2_weights,
                                               gemm2_weights_scale, used_tiles=schedule.num_used_tiles,
                                               name="moe_gemm2_mosaic", interpret=interpret,
                                               w_scale_rows=gemm2_scale_rows,
                                               row_factor=schedule.row_weight if in_kernel else None,
                                               out_dtype=_rows_dtype(tiling), chain_items=tiling.chain_items,
                                               group_m=tiling.gemm2.group_m)
  return combine.combine_rows(weighted_rows, schedule.pair_padded_row, poison=poison, out_dtype=out_dtype,
                              tiling=tiling.combine, interpret=interpret)


def _experts(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
             gemm2_weights_scale, schedule: TileSchedule, *, tiling: MoETiling, out_dtype, interpret,
             intermediate_dtype, poison=None):
  if tiling.mosaic:
    return _experts_mosaic(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
                           gemm2_weights_scale, schedule, tiling=tiling, out_dtype=out_dtype, interpret=interpret,
                           poison=poison)
  gemm1_args = (schedule.tile_expert, schedule.row_token, hidden_states, hidden_states_scale, gemm1_weights,
                gemm1_weights_scale)
  if tiling.gemm1_busy is not None:
    # Both GEMM1 launches; the count of used tiles on the device picks the one that computes.
    select = dict(used_tiles=schedule.num_used_tiles, out_dtype=intermediate_dtype, interpret=interpret)
    first = grouped_gemm.gemm1_swiglu(*gemm1_args, tiling=tiling.gemm1, used_tiles_range=(0, tiling.busy_min_tiles),
                                      **select)
    swiglu, swiglu_scale = grouped_gemm.gemm1_swiglu(
        *gemm1_args, tiling=tiling.gemm1_busy, used_tiles_range=(tiling.busy_min_tiles, 2**31 - 1), into=first,
        **select)
  elif tiling.gemm1.stream_k:
    swiglu, swiglu_scale = stream_k.gemm1_swiglu(*gemm1_args, schedule.num_used_tiles, tiling=tiling.gemm1,
                                                 out_dtype=intermediate_dtype, interpret=interpret,
                                                 arrival_counters=schedule.arrival_counters)
  else:
    swiglu, swiglu_scale = grouped_gemm.gemm1_swiglu(*gemm1_args, tiling=tiling.gemm1, out_dtype=intermediate_dtype,
                                                     interpret=interpret)
  weighted_rows = grouped_gemm.gemm2_weighted(
      schedule.tile_expert, swiglu, swiglu_scale, gemm2_weights, gemm2_weights_scale, schedule.row_weight,
      tiling=tiling.gemm2, interpret=interpret, out_dtype=_rows_dtype(tiling))
  return combine.combine_rows(weighted_rows, schedule.pair_padded_row, poison=poison, out_dtype=out_dtype,
                              tiling=tiling.combine, num_splits=tiling.gemm2.split_k, interpret=interpret)


def apply_local_experts_triton(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
                               gemm2_weights, gemm2_weights_scale, plan: RoutingPlan, *,
                               out_dtype=jnp.float32, interpret=False, intermediate_dtype=jnp.float8_e4m3fn,
                               tiling: MoETiling | None = None):
  """Same contract as `moe_pallas.apply_local_experts` (see there), computed by Pallas kernels.

  Args (beyond apply_local_experts'):
    tiling: the GEMMs' tiles; default `default_tiling(T, top_k, E_local, hidden=H, intermediate=I)`.

  Raises:
    NotImplementedError: the Pallas-Triton internals moved; `implementation=None` then falls back to the
      xla path.
  """
  triton_internals.check_pallas_triton_internals()
  num_tokens, hidden = hidden_states.shape
  if num_tokens == 0:
    return jnp.zeros((0, hidden), out_dtype)
  tiling = _tiling_for(tiling, num_tokens, plan.pair_rows.shape[1], gemm1_weights.shape[0], hidden,
                       weight_layout.logical_shape(gemm2_weights)[2], intermediate_dtype)
  schedule = make_tile_schedule(plan, block_m=tiling.block_m)
  return _experts(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
                  gemm2_weights_scale, schedule, tiling=tiling, out_dtype=out_dtype, interpret=interpret,
                  intermediate_dtype=intermediate_dtype)


def moe_layer_triton(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                     gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, local_expert_offset,
                     routed_scaling_factor, *, config: MoEConfig, out_dtype=jnp.bfloat16, interpret=False,
                     intermediate_dtype=jnp.float8_e4m3fn, tiling: MoETiling | None = None,
                     fused_routing_kernels: bool | None = None):
  """The whole layer (SPEC.md steps 1-7) on the kernels, from validated inputs, inside a jitted program.

  A NaN in the routing inputs makes the affected rows NaN (`routing.nan_poison`, added in the combine).

  Args (beyond moe_layer's):
    tiling: the GEMMs' tiles; default `default_tiling(T, top_k, E_local, hidden=H, intermediate=I)` for this device.
    fused_routing_kernels: route and schedule with the Pallas kernels of `fused_routing` (True) or
      with XLA (False); None: fused up to `fused_routing.MAX_FUSED_PAIRS` picks where the geometry
      allows (`fused_routing.supports`). Both give the same schedule (tested).

  Raises:
    NotImplementedError: as `apply_local_experts_triton`.
  """
  triton_internals.check_pallas_triton_internals()
  num_tokens, hidden = hidden_states.shape
  if num_tokens == 0:
    return jnp.zeros((0, hidden), out_dtype)
  num_local = gemm1_weights.shape[0]
  intermediate = weight_layout.logical_shape(gemm2_weights)[2]
  tiling = _tiling_for(tiling, num_tokens, config.top_k, num_local, hidden, intermediate, intermediate_dtype)
  if fused_routing_kernels is None:
    fused_routing_kernels = (num_tokens * config.top_k <= fused_routing.MAX_FUSED_PAIRS
                             and fused_routing.supports(config))
  if fused_routing_kernels:
    num_tiles = max_tiles(num_tokens * config.top_k, num_local, tiling.block_m)
    schedule, _, _, poison = fused_routing.route_and_schedule(
        routing_logits, routing_bias, routed_scaling_factor, local_expert_offset, config=config,
        num_local_experts=num_local, block_m=tiling.block_m, interpret=interpret,
        num_zeros=stream_k.num_arrival_counters(tiling.gemm1, num_tiles, intermediate))
  else:
    topk_ids, topk_weights = grouped_topk(routing_logits, routing_bias, config=config,
                                          routed_scaling_factor=routed_scaling_factor)
    plan = sort_local_pairs(topk_ids, topk_weights, local_expert_offset=local_expert_offset,
                            num_local_experts=num_local)
    schedule = make_tile_schedule(plan, block_m=tiling.block_m)
    poison = nan_poison(routing_logits, routing_bias)
  # A NaN in the routing inputs turns the token's row NaN (routing.nan_poison), added in the combine.
  return _experts(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
                  gemm2_weights_scale, schedule, tiling=tiling, out_dtype=out_dtype, interpret=interpret,
                  intermediate_dtype=intermediate_dtype, poison=poison)
