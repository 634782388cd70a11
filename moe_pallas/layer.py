"""The public layer: the gate (`validation`, once per call), then one jitted program per call signature.

moe_layer = route -> plan_local -> apply_local_experts -> bf16. The pieces are public so that a sharded
caller can run routing once, add the ranks' float32 partial sums and round to bf16 once (SPEC.md step 7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_pallas import reference, validation
from moe_pallas.config import MoEConfig
from moe_pallas.quant import LocalExperts
from moe_pallas.routing import RoutingPlan, grouped_topk, nan_poison, sort_local_pairs
from moe_pallas.validation import IMPLEMENTATIONS, Checked, resolve_implementation

__all__ = ["IMPLEMENTATIONS", "InferenceOnlyError", "apply_local_experts", "inference_only", "local_expert_outputs",
           "moe_layer", "resolve_implementation"]


class InferenceOnlyError(TypeError):
  """Raised when JAX differentiates through the layer (jax.grad, jax.vjp, jax.jvp, jax.linearize)."""


INFERENCE_ONLY_MESSAGE = (
    "the moe_pallas MoE layer (moe_layer, apply_local_experts, moe_layer_sharded, moe_layer_all_experts) is "
    "inference-only: it defines no gradient on either implementation ('xla' or 'triton'), so jax.grad, jax.vjp, "
    "jax.jvp and jax.linearize cannot differentiate through it. Apply jax.lax.stop_gradient to its inputs if the "
    "rest of the model is being differentiated and no gradient needs to flow through the layer.")


def inference_only(fn):
  """`fn(static, *operands)` as a `jax.custom_jvp` whose derivative rule raises `InferenceOnlyError`.

  Forward-mode and reverse-mode differentiation both go through the JVP rule, so jax.grad, jax.vjp, jax.jvp
  and jax.linearize all raise the same error, on every implementation, instead of returning gradients of the
  "xla" path's jnp code (which the kernels could not match) or failing inside Pallas. The rule runs only
  when a nonzero tangent reaches the layer: inputs behind `jax.lax.stop_gradient` pass.
  """
  wrapped = jax.custom_jvp(fn, nondiff_argnums=(0,))

  def raise_inference_only(static, primals, tangents):
    del static, primals, tangents
    raise InferenceOnlyError(INFERENCE_ONLY_MESSAGE)

  wrapped.defjvp(raise_inference_only)
  return wrapped


def apply_local_experts(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
                        gemm2_weights, gemm2_weights_scale, plan: RoutingPlan, *, out_dtype=jnp.float32,
                        implementation=None, interpret=False, intermediate_dtype=jnp.float8_e4m3fn):
  """Weighted sum over this rank's local experts of the pairs in `plan` (SPEC.md steps 1, 6, 7).

  Args:
    hidden_states: [T, H] float8_e4m3fn.
    hidden_states_scale: [H/128, T] float32 (the public, transposed layout).
    gemm1_weights: [E_local, 2I, H] float8_e4m3fn; gemm1_weights_scale: [E_local, 2I/128, H/128] float32.
    gemm2_weights: [E_local, H, I] float8_e4m3fn; gemm2_weights_scale: [E_local, H/128, I/128] float32.
      Either weight array may be block-major instead, as in `moe_layer`.
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
    ValueError / TypeError for arrays whose shapes or dtypes disagree with each other or with the plan, an
    out_dtype other than float32 / bfloat16, a bad intermediate_dtype or implementation.
  """
  checked = validation.check_apply_local_experts(
      hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale,
      plan, out_dtype=out_dtype, implementation=implementation, interpret=interpret,
      intermediate_dtype=intermediate_dtype)
  experts = LocalExperts.from_arrays(gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale)
  return local_expert_outputs(hidden_states, hidden_states_scale, experts, plan, checked=checked)


def local_expert_outputs(hidden_states, hidden_states_scale, experts: LocalExperts, plan: RoutingPlan, *,
                         checked: Checked):
  """`apply_local_experts`' computation from checked inputs: the core that every layer entry traces.

  Inference-only (see `inference_only`): differentiating through it raises `InferenceOnlyError`.
  """
  return _local_expert_outputs(checked, hidden_states, hidden_states_scale, experts, plan)


@inference_only
def _local_expert_outputs(checked: Checked, hidden_states, hidden_states_scale, experts: LocalExperts,
                          plan: RoutingPlan):
  if checked.implementation == "triton":
    from moe_pallas.kernels import grouped_moe  # the kernel tier imports Pallas internals: load it on use
    try:
      return grouped_moe.apply_local_experts_triton(
          hidden_states, hidden_states_scale, *experts.arrays(), plan, out_dtype=checked.out_dtype,
          interpret=checked.interpret, intermediate_dtype=checked.intermediate_dtype)
    except NotImplementedError:
      if not checked.fall_back:  # asked for by name: say why it cannot run
        raise
      # Best available (None): a case the kernels do not cover falls through to the reference, as
      # tokamax's dispatch does. This happens while tracing, never on device values.
  return reference.apply_local_experts_xla(hidden_states, hidden_states_scale, experts, plan,
                                           out_dtype=checked.out_dtype)


def _check_finite(routing_logits, routing_bias, hidden_states, hidden_states_scale, experts: LocalExperts,
                  routed_scaling_factor):
  """`checkify.check`s (moe_layer's check_finite=True) for the non-finite inputs that the layer otherwise
  turns into NaN rows (README, "Non-finite inputs"). The FP8 weights themselves are not read: that would
  cost every expert's weights on every call; their scales are."""
  from jax.experimental import checkify  # only when asked for

  def check(name, bad):
    checkify.check(~jnp.any(bad), f"moe_layer(check_finite=True): {name} (first at flat index {{index}})",
                   index=jnp.argmax(bad.ravel()))

  check("routing_logits holds a NaN", jnp.isnan(routing_logits))
  check("routing_bias holds a non-finite value", ~jnp.isfinite(routing_bias.astype(jnp.float32)))
  check("hidden_states holds a NaN", jnp.isnan(hidden_states.astype(jnp.float32)))
  check("hidden_states_scale holds a non-finite value", ~jnp.isfinite(hidden_states_scale))
  for name, scale in (("gemm1_weights_scale", experts.gemm1.scales), ("gemm2_weights_scale", experts.gemm2.scales)):
    check(f"{name} holds a non-finite value", ~jnp.isfinite(scale))
  check("routed_scaling_factor is not finite", ~jnp.isfinite(routed_scaling_factor))


@functools.partial(jax.jit, static_argnames=("checked", "check_finite"))
def _moe_layer_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, experts: LocalExperts,
                       local_expert_offset, routed_scaling_factor, *, checked: Checked, check_finite: bool = False):
  local_expert_offset = jnp.asarray(local_expert_offset, jnp.int32)
  routed_scaling_factor = jnp.asarray(routed_scaling_factor, jnp.float32)
  if check_finite:
    _check_finite(routing_logits, routing_bias, hidden_states, hidden_states_scale, experts, routed_scaling_factor)
  return _moe_layer_core(checked, routing_logits, routing_bias, hidden_states, hidden_states_scale, experts,
                         local_expert_offset, routed_scaling_factor)


@inference_only
def _moe_layer_core(checked: Checked, routing_logits, routing_bias, hidden_states, hidden_states_scale,
                    experts: LocalExperts, local_expert_offset, routed_scaling_factor):
  """The traced layer. Each implementation adds `nan_poison` to every float32 output row before rounding:
  the kernels in their combine kernel, the xla path here."""
  config = checked.config
  if checked.implementation == "triton":
    from moe_pallas.kernels import grouped_moe  # the kernel tier imports Pallas internals: load it on use
    try:
      # Routing included: up to fused_routing.MAX_FUSED_PAIRS picks it runs as one to four Pallas kernels
      # instead of 20-44 XLA ones.
      return grouped_moe.moe_layer_triton(routing_logits, routing_bias, hidden_states, hidden_states_scale,
                                          *experts.arrays(), local_expert_offset, routed_scaling_factor,
                                          config=config, out_dtype=checked.out_dtype, interpret=checked.interpret,
                                          intermediate_dtype=checked.intermediate_dtype)
    except NotImplementedError:
      if not checked.fall_back:
        raise
  topk_ids, topk_weights = grouped_topk(routing_logits, routing_bias, config=config,
                                        routed_scaling_factor=routed_scaling_factor)
  plan = sort_local_pairs(topk_ids, topk_weights, local_expert_offset=local_expert_offset,
                          num_local_experts=config.num_local_experts)
  # Both implementations sum in float32, add the NaN poison and round to bf16 once, at their last step.
  out = reference.apply_local_experts_xla(hidden_states, hidden_states_scale, experts, plan, out_dtype=jnp.float32)
  return (out + nan_poison(routing_logits, routing_bias)[:, None]).astype(checked.out_dtype)


def moe_layer(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
              gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, local_expert_offset,
              routed_scaling_factor, config: MoEConfig | None = None, implementation: str | None = None,
              interpret: bool = False, intermediate_dtype=jnp.float8_e4m3fn, check_finite: bool = False):
  """DeepSeek-V3 FP8 block-scale MoE layer, one expert-parallel rank (SPEC.md), as one jitted program.

  Args:
    routing_logits: [T, E] float32.
    routing_bias: [E] bfloat16 or float32; used for expert selection only.
    hidden_states: [T, H] float8_e4m3fn.
    hidden_states_scale: [H/128, T] float32 (transposed: scale[b, t] multiplies hidden_states[t, b*128:(b+1)*128]).
    gemm1_weights: [E_local, 2I, H] float8_e4m3fn (W13, [out, in]); gemm1_weights_scale: [E_local, 2I/128, H/128].
    gemm2_weights: [E_local, H, I] float8_e4m3fn (W2); gemm2_weights_scale: [E_local, H/128, I/128].
      Either weight array may be block-major instead (`moe_pallas.to_block_major`: [E_local, N/128, K/128,
      128, 128], the same values with each 128 x 128 scale block contiguous): the kernels read it faster
      (on the H200 GEMM1 4-9 %, GEMM2 1-5 %: experiments/PERF.md 64); reorder once, when the weights are
      loaded. The scales keep their shape.
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
    check_finite: add `jax.experimental.checkify` checks that report a NaN in routing_logits or
      hidden_states, or a non-finite routing_bias, scale or scaling factor, as an error (the weights' FP8
      values are not read). The call must then run under `checkify.checkify` (README, "Non-finite
      inputs"); without it JAX raises "Cannot abstractly evaluate a checkify.check ...".

  Returns:
    [T, H] bfloat16; a token with no local expert gets an all-zero row. Non-finite inputs (README, "Non-finite
    inputs"): a NaN in routing_logits[t] makes row t all NaN, a NaN in routing_bias makes every row NaN
    (`routing.nan_poison`), so a NaN never silently reroutes; +-inf logits are valid (the sigmoid saturates).

  Raises:
    ValueError / TypeError naming the argument, the expected and the received value, for a wrong rank,
    shape, dtype, size that is not a multiple of 128, scale layout, or (when concrete) out-of-range
    offset or non-finite scaling factor. The scale layout is checked by shape only: when T = H/128 the two
    layouts have the same shape and a [T, H/128] array is taken as [H/128, T] (README).
    InferenceOnlyError (a TypeError) when differentiated: the layer is inference-only.
  """
  checked = validation.check_layer(
      routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
      gemm2_weights, gemm2_weights_scale, local_expert_offset=local_expert_offset,
      routed_scaling_factor=routed_scaling_factor, config=config, implementation=implementation,
      interpret=interpret, intermediate_dtype=intermediate_dtype, check_finite=check_finite)
  num_tokens = routing_logits.shape[0]
  if num_tokens == 0:
    return jnp.zeros((0, checked.config.hidden), jnp.bfloat16)
  experts = LocalExperts.from_arrays(gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale)
  # The scalars go in as they came and are converted inside the program: a conversion here would be a
  # device program of its own per call, launched ahead of the layer's.
  return _moe_layer_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, experts,
                            local_expert_offset, routed_scaling_factor, checked=checked, check_finite=check_finite)
