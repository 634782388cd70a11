"""The layer's expert computation in plain jnp: the `"xla"` implementation and the kernels' cross-check.

One local expert at a time (a `fori_loop`), so the full DeepSeek-V3 shape never holds more than one
expert's weights in float32 (117 MB for W13) instead of all 32 (3.8 GB); an expert that no token picked is
skipped by a `cond`, so it costs no weight reads. Each touched expert runs over all T tokens and the
routing weight (0 for tokens that did not pick it) selects the rows: simple and exact, at the price of
T instead of n_e rows of work per touched expert. The kernels do the sparse version.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_pallas import quant
from moe_pallas.routing import RoutingPlan


def swiglu(gate_up: jax.Array) -> jax.Array:
  """[..., 2I] -> [..., I]: silu on the SECOND half times the first (SPEC.md step 6).

  `jax.nn.silu` is x * sigmoid(x), which stays finite for large |x| (no inf * 0).
  """
  half = gate_up.shape[-1] // 2
  return jax.nn.silu(gate_up[..., half:]) * gate_up[..., :half]


def dequantize_activations(hidden_states: jax.Array, hidden_states_scale: jax.Array) -> jax.Array:
  """fp8 [T, H] with public-layout scales [H/B, T] -> float32 [T, H]."""
  scales = quant.activation_scale_from_public(hidden_states_scale)
  block = hidden_states.shape[1] // scales.shape[1]
  return quant.dequantize(quant.BlockScaledArray(hidden_states, scales, (1, block)))


def dense_routing_weights(plan: RoutingPlan, num_tokens: int) -> tuple[jax.Array, jax.Array]:
  """The plan as a dense [T, E_local] weight matrix and its pick mask (padding rows land in a spare column)."""
  num_local = plan.num_local_experts
  shape = (num_tokens, num_local + 1)
  weights = jnp.zeros(shape, jnp.float32).at[plan.token_ids, plan.expert_ids].add(plan.weights)
  picked = jnp.zeros(shape, jnp.bool_).at[plan.token_ids, plan.expert_ids].set(True)
  return weights[:, :num_local], picked[:, :num_local]


def apply_local_experts_xla(hidden_states, hidden_states_scale, experts: quant.LocalExperts, plan: RoutingPlan, *,
                            out_dtype=jnp.float32) -> jax.Array:
  """Weighted sum over this rank's local experts, [T, H] in `out_dtype` (accumulated in float32)."""
  experts = experts.in_spec_order()
  num_tokens, hidden = hidden_states.shape
  activations = dequantize_activations(hidden_states, hidden_states_scale)
  token_weights, token_picked = dense_routing_weights(plan, num_tokens)

  def expert_output(e, acc):
    one = experts.select(e)
    w13, w2 = quant.dequantize(one.gemm1), quant.dequantize(one.gemm2)
    gate_up = jnp.dot(activations, w13.T, preferred_element_type=jnp.float32)
    down = jnp.dot(swiglu(gate_up), w2.T, preferred_element_type=jnp.float32)
    # `where`, not a multiply by a zero weight: a token that did not pick e must get exact zeros even
    # where its (unused) expert output is not finite.
    return acc + jnp.where(token_picked[:, e, None], token_weights[:, e, None] * down, 0.0)

  def maybe_expert_output(e, acc):
    return jax.lax.cond(plan.group_sizes[e] > 0, expert_output, lambda e, acc: acc, e, acc)

  out = jax.lax.fori_loop(0, experts.num_experts, maybe_expert_output, jnp.zeros((num_tokens, hidden), jnp.float32))
  return out.astype(out_dtype)
