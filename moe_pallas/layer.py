"""The public layer: validation, implementation dispatch, and one jitted program per call signature.

moe_layer = route -> plan_local -> apply_local_experts -> bf16. The pieces are public so that a sharded
caller can run routing once, add the ranks' float32 partial sums and round to bf16 once (SPEC.md step 7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_pallas import reference, validation
from moe_pallas.config import MoEConfig
from moe_pallas.routing import RoutingPlan, plan_local, route

IMPLEMENTATIONS = ("xla", "triton")
# FP8 wgmma / mma with e4m3 operands exists from Ada (8.9) and Hopper (9.0) on.
_MIN_TRITON_COMPUTE_CAPABILITY = (8, 9)


def _gpu_supports_triton(device) -> bool:
  if device.platform != "gpu":
    return False
  capability = getattr(device, "compute_capability", None)
  if capability is None:
    return False
  major, minor = (int(part) for part in str(capability).split(".")[:2])
  return (major, minor) >= _MIN_TRITON_COMPUTE_CAPABILITY


def resolve_implementation(implementation, *, interpret: bool) -> str:
  """None picks "triton" on NVIDIA GPUs of compute capability >= 8.9 (or in interpret mode), else "xla"."""
  if implementation is None:
    if interpret or _gpu_supports_triton(jax.devices()[0]):
      return "triton"
    return "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  if implementation == "triton" and not interpret and not _gpu_supports_triton(jax.devices()[0]):
    raise ValueError(
        f"implementation='triton' needs an NVIDIA GPU of compute capability >= 8.9, but the default device "
        f"is {jax.devices()[0].device_kind!r}; pass interpret=True to run the kernels in interpret mode, or "
        "implementation='xla'")
  return implementation


def apply_local_experts(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
                        gemm2_weights, gemm2_weights_scale, plan: RoutingPlan, *, out_dtype=jnp.float32,
                        implementation=None, interpret=False, intermediate_dtype=jnp.float8_e4m3fn):
  """Weighted sum over this rank's local experts of the pairs in `plan` (SPEC.md steps 1, 6, 7).

  Args:
    hidden_states: [T, H] float8_e4m3fn.
    hidden_states_scale: [H/128, T] float32 (the public, transposed layout).
    gemm1_weights: [E_local, 2I, H] float8_e4m3fn; gemm1_weights_scale: [E_local, 2I/128, H/128] float32.
    gemm2_weights: [E_local, H, I] float8_e4m3fn; gemm2_weights_scale: [E_local, H/128, I/128] float32.
    plan: from `plan_local`, with E_local experts and capacity T * top_k.
    out_dtype: float32 (default) for partial sums that are added across ranks before rounding, or bfloat16.
    implementation: "xla", "triton" or None: the best available (see `resolve_implementation`); with None,
      a case the kernels do not cover (they raise NotImplementedError) runs on "xla".
    interpret: run Pallas kernels in interpret mode (CPU).
    intermediate_dtype: SwiGLU output precision before GEMM2 in the kernels: float8_e4m3fn (1x128 block
      scales, as the fast paths do) or bfloat16. The xla path keeps float32 (its dots at XLA's default
      matmul precision: TF32 on Ampere/Hopper GPUs).

  Returns:
    [T, H] in `out_dtype`; rows of tokens with no local pair are zero.

  Raises:
    ValueError / TypeError for arrays whose shapes or dtypes disagree with each other or with the plan.
  """
  _, num_local, _ = validation.validate_expert_arrays(hidden_states, hidden_states_scale, gemm1_weights,
                                                      gemm1_weights_scale, gemm2_weights, gemm2_weights_scale)
  validation.validate_plan(plan, num_tokens=hidden_states.shape[0], num_local_experts=num_local)
  validation.validate_intermediate_dtype(intermediate_dtype)
  chosen = resolve_implementation(implementation, interpret=interpret)
  if chosen == "triton":
    from moe_pallas.kernels import grouped_moe  # the kernel tier imports Pallas internals: load it on use
    try:
      return grouped_moe.apply_local_experts_triton(hidden_states, hidden_states_scale, gemm1_weights,
                                                    gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, plan,
                                                    out_dtype=out_dtype, interpret=interpret,
                                                    intermediate_dtype=intermediate_dtype)
    except NotImplementedError:
      if implementation is not None:  # asked for by name: say why it cannot run
        raise
      # Best available (None): a case the kernels do not cover falls through to the reference, as
      # tokamax's dispatch does. This happens while tracing, never on device values.
  return reference.apply_local_experts_xla(hidden_states, hidden_states_scale, gemm1_weights,
                                           gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, plan,
                                           out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("config", "implementation", "interpret", "intermediate_dtype"))
def _moe_layer_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                       gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, local_expert_offset,
                       routed_scaling_factor, *, config: MoEConfig, implementation: str, interpret: bool,
                       intermediate_dtype):
  local_expert_offset = jnp.asarray(local_expert_offset, jnp.int32)
  routed_scaling_factor = jnp.asarray(routed_scaling_factor, jnp.float32)
  chosen = resolve_implementation(implementation, interpret=interpret)
  if chosen == "triton":
    from moe_pallas.kernels import grouped_moe  # the kernel tier imports Pallas internals: load it on use
    try:
      # Routing included: at small T it runs as two Pallas kernels instead of ~20 XLA ones.
      return grouped_moe.moe_layer_triton(routing_logits, routing_bias, hidden_states, hidden_states_scale,
                                          gemm1_weights, gemm1_weights_scale, gemm2_weights,
                                          gemm2_weights_scale, local_expert_offset, routed_scaling_factor,
                                          config=config, out_dtype=jnp.bfloat16, interpret=interpret,
                                          intermediate_dtype=intermediate_dtype)
    except NotImplementedError:
      if implementation is not None:  # asked for by name: say why it cannot run
        raise
  topk_ids, topk_weights = route(routing_logits, routing_bias, config=config,
                                 routed_scaling_factor=routed_scaling_factor)
  plan = plan_local(topk_ids, topk_weights, local_expert_offset=local_expert_offset,
                    num_local_experts=config.num_local_experts)
  # Both implementations sum in float32 and round to bf16 once, at their last step.
  return reference.apply_local_experts_xla(hidden_states, hidden_states_scale, gemm1_weights,
                                           gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, plan,
                                           out_dtype=jnp.bfloat16)


def moe_layer(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
              gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, local_expert_offset,
              routed_scaling_factor, config: MoEConfig | None = None, implementation: str | None = None,
              interpret: bool = False, intermediate_dtype=jnp.float8_e4m3fn):
  """DeepSeek-V3 FP8 block-scale MoE layer, one expert-parallel rank (SPEC.md), as one jitted program.

  Args:
    routing_logits: [T, E] float32.
    routing_bias: [E] bfloat16 or float32; used for expert selection only.
    hidden_states: [T, H] float8_e4m3fn.
    hidden_states_scale: [H/128, T] float32 (transposed: scale[b, t] multiplies hidden_states[t, b*128:(b+1)*128]).
    gemm1_weights: [E_local, 2I, H] float8_e4m3fn (W13, [out, in]); gemm1_weights_scale: [E_local, 2I/128, H/128].
    gemm2_weights: [E_local, H, I] float8_e4m3fn (W2); gemm2_weights_scale: [E_local, H/128, I/128].
    local_expert_offset: int, global id of local expert 0, in [0, E - E_local]. May be traced (e.g. from
      `lax.axis_index`) or a jax.Array: such a value is not range-checked (reading it would be a device-to-
      host sync), and an out-of-range one selects only the experts that fall inside [0, E), possibly none
      (all-zero output).
    routed_scaling_factor: float multiplying the normalized routing weights (2.5 in DeepSeek-V3). Must be
      finite; a traced or jax.Array non-finite value is not caught and propagates into every routed row.
    config: routing constants (top_k, n_group, topk_group); defaults to DeepSeek-V3's when E = 256 and is
      required otherwise. Its sizes must match the shapes.
    implementation: "xla" (pure jnp), "triton" (Pallas kernels) or None for the best available.
    interpret: run the Pallas kernels in interpret mode (CPU).
    intermediate_dtype: float8_e4m3fn (default) or bfloat16: the SwiGLU output's precision before GEMM2
      on the kernel path.

  Returns:
    [T, H] bfloat16; a token with no local expert gets an all-zero row.

  Raises:
    ValueError / TypeError naming the argument, the expected and the received value, for a wrong rank,
    shape, dtype, size that is not a multiple of 128, scale layout, or (when concrete) out-of-range
    offset or non-finite scaling factor.
  """
  config = validation.validate_layer_inputs(
      routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
      gemm2_weights, gemm2_weights_scale, local_expert_offset=local_expert_offset,
      routed_scaling_factor=routed_scaling_factor, config=config)
  validation.validate_intermediate_dtype(intermediate_dtype)
  resolve_implementation(implementation, interpret=interpret)  # a bad name fails here, before tracing
  num_tokens = routing_logits.shape[0]
  if num_tokens == 0:
    return jnp.zeros((0, config.hidden), jnp.bfloat16)
  # The scalars go in as they came and are converted inside the program: a conversion here would be a
  # device program of its own per call, launched ahead of the layer's.
  return _moe_layer_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                            gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, local_expert_offset,
                            routed_scaling_factor, config=config,
                            implementation=implementation, interpret=interpret,
                            intermediate_dtype=jnp.dtype(intermediate_dtype))
