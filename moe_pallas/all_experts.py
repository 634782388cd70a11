"""The single-device layer over all E experts: what `moe_layer_sharded` must equal, computed on one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_pallas import validation
from moe_pallas.config import MoEConfig
from moe_pallas.layer import local_expert_outputs
from moe_pallas.quant import LocalExperts
from moe_pallas.routing import grouped_topk, nan_poison, sort_local_pairs
from moe_pallas.validation import Checked


def moe_layer_all_experts(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                          gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, routed_scaling_factor,
                          config: MoEConfig | None = None, experts_per_call: int | None = None,
                          implementation: str | None = None, interpret: bool = False,
                          intermediate_dtype=jnp.float8_e4m3fn):
  """The single-device computation `moe_layer_sharded` must equal: all E experts on one device.

  The float32 sum of the E / experts_per_call single-rank partials (`apply_local_experts` with offsets
  0, experts_per_call, ...), rounded to bfloat16 once. Arguments as in `moe_layer_sharded`; `experts_per_call`
  (default E) must divide E. Meant for arrays on one device: weights sharded over an Explicit mesh axis
  cannot be sliced into chunks here (pass the unsharded arrays).

  Returns:
    [T, H] bfloat16.

  Raises:
    ValueError / TypeError as `moe_layer_sharded` for the arrays and the config, and for an
    `experts_per_call` that does not divide E.
  """
  checked = validation.check_all_experts(
      routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
      gemm2_weights, gemm2_weights_scale, routed_scaling_factor=routed_scaling_factor, config=config,
      implementation=implementation, interpret=interpret, intermediate_dtype=intermediate_dtype)
  num_experts = checked.config.num_experts
  experts_per_call = num_experts if experts_per_call is None else experts_per_call
  if num_experts % experts_per_call:
    raise ValueError(f"experts_per_call={experts_per_call} must divide E={num_experts}")
  checked = checked._replace(config=checked.config.with_local_experts(experts_per_call), out_dtype=jnp.float32)
  experts = LocalExperts.from_arrays(gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale)
  return _all_experts_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, experts,
                              routed_scaling_factor, checked=checked)


@functools.partial(jax.jit, static_argnames=("checked",))
def _all_experts_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, experts: LocalExperts,
                         routed_scaling_factor, *, checked: Checked):
  config = checked.config
  topk_ids, topk_weights = grouped_topk(routing_logits, routing_bias, config=config,
                                        routed_scaling_factor=routed_scaling_factor)
  num_local = config.num_local_experts
  out = jnp.zeros(hidden_states.shape, jnp.float32)
  for first in range(0, config.num_experts, num_local):
    plan = sort_local_pairs(topk_ids, topk_weights, local_expert_offset=first, num_local_experts=num_local)
    out = out + local_expert_outputs(hidden_states, hidden_states_scale,
                                     experts.select(slice(first, first + num_local)), plan, checked=checked)
  # The NaN poison (routing.nan_poison), added once to the float32 sum, as moe_layer does.
  return (out + nan_poison(routing_logits, routing_bias)[:, None]).astype(jnp.bfloat16)
