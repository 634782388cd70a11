"""The layer's expert computation on the kernels: the `"triton"` implementation.

plan -> tile schedule -> GEMM1 (rows gathered in its loads) + SwiGLU + FP8 quant -> GEMM2 x routing
weight -> combine (each token's rows summed in float32, rounded once). All of it traces into the
caller's jitted program: three Pallas kernels, after the ~20 small XLA kernels of routing, plan and
schedule (at small T their launches, not their work, are a large part of the layer's time).
"""

from __future__ import annotations

import jax.numpy as jnp

from moe_pallas.kernels import combine, fp8_dot, grouped_gemm
from moe_pallas.kernels.schedule import make_tile_schedule
from moe_pallas.kernels.tiling import MoETiling, default_tiling
from moe_pallas.routing import RoutingPlan


def apply_local_experts_triton(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
                               gemm2_weights, gemm2_weights_scale, plan: RoutingPlan, *,
                               out_dtype=jnp.float32, interpret=False, intermediate_dtype=jnp.float8_e4m3fn,
                               tiling: MoETiling | None = None):
  """Same contract as `moe_pallas.apply_local_experts` (see there), computed by Pallas kernels.

  Args (beyond apply_local_experts'):
    tiling: the GEMMs' tiles; default `default_tiling(T, top_k, E_local)`.

  Raises:
    NotImplementedError: the Pallas-Triton internals moved, or an operand is too large for its int32
      offsets; `implementation=None` then falls back to the xla path.
  """
  fp8_dot.check_pallas_triton_internals()
  num_tokens, hidden = hidden_states.shape
  if num_tokens == 0:
    return jnp.zeros((0, hidden), out_dtype)
  top_k = plan.pair_rows.shape[1]
  num_local = gemm1_weights.shape[0]
  if tiling is None:
    tiling = default_tiling(num_tokens, top_k, num_local)

  schedule = make_tile_schedule(plan, block_m=tiling.block_m)
  # Weights are split per expert chunk where needed (grouped_gemm); the activations and the SwiGLU
  # output are not, so their sizes are checked here rather than read at wrapped addresses.
  for name, shape, dtype in (("hidden_states", hidden_states.shape, hidden_states.dtype),
                             ("the [rows, I] SwiGLU output", (schedule.num_rows, gemm2_weights.shape[2]),
                              intermediate_dtype)):
    if grouped_gemm.int32_offsets_overflow(shape, dtype):
      raise NotImplementedError(
          f"implementation='triton' cannot index {name} of shape {list(shape)} ({jnp.dtype(dtype).name}: "
          f"2**31 elements or more in 2**32 bytes or fewer overflow Pallas-Triton's int32 offsets at "
          f"T={num_tokens}); use implementation='xla' or split the tokens into smaller calls")
  swiglu, swiglu_scale = grouped_gemm.gemm1_swiglu(
      schedule.tile_expert, schedule.row_token, hidden_states, hidden_states_scale, gemm1_weights,
      gemm1_weights_scale, tiling=tiling.gemm1, out_dtype=intermediate_dtype, interpret=interpret)
  weighted_rows = grouped_gemm.gemm2_weighted(
      schedule.tile_expert, swiglu, swiglu_scale, gemm2_weights, gemm2_weights_scale, schedule.row_weight,
      tiling=tiling.gemm2, interpret=interpret)
  return combine.combine_rows(weighted_rows, schedule.pair_padded_row, out_dtype=out_dtype,
                              interpret=interpret)
