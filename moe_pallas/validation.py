"""Input checks at the public boundary: every message names the argument, what was expected and what came."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moe_pallas.config import MoEConfig

_FP8 = jnp.dtype(jnp.float8_e4m3fn)
_F32 = jnp.dtype(jnp.float32)
_BIAS_DTYPES = (jnp.dtype(jnp.bfloat16), _F32)


# Read .shape/.dtype first and fall back to NumPy only for Python scalars and lists: np.asarray on a
# tracer (a traced offset or factor) raises, so the fallback must not be evaluated eagerly.
def _shape(x):
  shape = getattr(x, "shape", None)
  return tuple(shape) if shape is not None else np.shape(x)


def _dtype(x):
  dtype = getattr(x, "dtype", None)
  return jnp.dtype(dtype if dtype is not None else np.asarray(x).dtype)


def _expect_dtype(name, x, allowed):
  allowed = tuple(jnp.dtype(d) for d in allowed)
  if _dtype(x) not in allowed:
    names = " or ".join(d.name for d in allowed)
    raise TypeError(f"{name} must have dtype {names}, got {_dtype(x).name}")


def _expect_shape(name, x, expected, meaning):
  if _shape(x) != tuple(expected):
    raise ValueError(f"{name} must have shape {list(expected)} ({meaning}), got {list(_shape(x))}")


def _expect_rank(name, x, rank, meaning):
  if len(_shape(x)) != rank:
    raise ValueError(f"{name} must have rank {rank} ({meaning}), got shape {list(_shape(x))}")


def concrete_value(x):
  """The value of a Python or NumPy scalar, or None for a jax.Array (traced or not).

  A jax.Array is not read: np.asarray on it would copy it to the host and wait for the device, a sync
  on every call. Such values are documented as unchecked, like traced ones.
  """
  if isinstance(x, jax.Array):
    return None
  return np.asarray(x)


def resolve_config(config, *, num_experts, hidden, intermediate, num_local_experts, block) -> MoEConfig:
  """Sizes come from the shapes; routing constants from `config`, or DeepSeek-V3's when E = 256."""
  if config is None:
    if num_experts != 256:
      raise ValueError(
          f"config is required when routing_logits has E={num_experts} experts: the routing constants "
          "(top_k, n_group, topk_group) default to DeepSeek-V3's (8, 8, 4) only for E=256")
    preset = MoEConfig.deepseek_v3()
    top_k, n_group, topk_group = preset.top_k, preset.n_group, preset.topk_group
  else:
    if not isinstance(config, MoEConfig):
      raise TypeError(f"config must be a moe_pallas.MoEConfig or None, got {type(config).__name__}")
    given = dict(num_experts=num_experts, hidden=hidden, intermediate=intermediate,
                 num_local_experts=num_local_experts, block=block)
    for field, value in given.items():
      if getattr(config, field) != value:
        raise ValueError(f"config.{field}={getattr(config, field)} does not match the inputs, whose shapes "
                         f"give {field}={value}")
    return config
  return MoEConfig(hidden=hidden, intermediate=intermediate, num_experts=num_experts,
                   num_local_experts=num_local_experts, top_k=top_k, n_group=n_group, topk_group=topk_group,
                   block=block)


def validate_layer_inputs(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                          gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, local_expert_offset,
                          routed_scaling_factor, config, block=128) -> MoEConfig:
  """Checks ranks, shapes, dtypes and (when concrete) values of the layer's inputs; returns the geometry."""
  _expect_rank("routing_logits", routing_logits, 2, "[T, E]")
  num_tokens, num_experts = _shape(routing_logits)
  _expect_rank("hidden_states", hidden_states, 2, "[T, H]")
  _expect_shape("hidden_states", hidden_states, (num_tokens, _shape(hidden_states)[1]),
                "[T, H], T from routing_logits")
  hidden, num_local, intermediate = validate_expert_arrays(
      hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale,
      block=block)
  _expect_shape("routing_bias", routing_bias, (num_experts,), "[E]")
  _expect_dtype("routing_logits", routing_logits, [_F32])
  _expect_dtype("routing_bias", routing_bias, _BIAS_DTYPES)

  config = resolve_config(config, num_experts=num_experts, hidden=hidden, intermediate=intermediate,
                          num_local_experts=num_local, block=block)
  validate_scalars(local_expert_offset=local_expert_offset, routed_scaling_factor=routed_scaling_factor,
                   config=config)
  return config


def validate_expert_arrays(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
                           gemm2_weights, gemm2_weights_scale, *, block=128) -> tuple[int, int, int]:
  """Ranks, shapes and dtypes of the activations and expert weights; returns (H, E_local, I)."""
  _expect_rank("hidden_states", hidden_states, 2, "[T, H]")
  _expect_rank("gemm1_weights", gemm1_weights, 3, "[E_local, 2I, H]")
  _expect_rank("gemm2_weights", gemm2_weights, 3, "[E_local, H, I]")
  num_tokens, hidden = _shape(hidden_states)
  num_local, two_i, _ = _shape(gemm1_weights)
  intermediate = two_i // 2

  for name, size, meaning in (("H (hidden_states.shape[1])", hidden, "hidden size"),
                              ("2I (gemm1_weights.shape[1])", two_i, "gate+up width")):
    if size <= 0 or size % block:
      raise ValueError(f"{name} must be a positive multiple of {block}, got {size}")
  if intermediate % block:
    raise ValueError(f"I = gemm1_weights.shape[1] / 2 must be a multiple of {block}, got {intermediate}")

  _expect_shape("hidden_states_scale", hidden_states_scale, (hidden // block, num_tokens),
                f"[H/{block}, T]: the public layout is transposed, scale[b, t] multiplies "
                f"hidden_states[t, b*{block}:(b+1)*{block}]")
  _expect_shape("gemm1_weights", gemm1_weights, (num_local, two_i, hidden), "[E_local, 2I, H]")
  _expect_shape("gemm1_weights_scale", gemm1_weights_scale, (num_local, two_i // block, hidden // block),
                f"[E_local, 2I/{block}, H/{block}]")
  _expect_shape("gemm2_weights", gemm2_weights, (num_local, hidden, intermediate), "[E_local, H, I]")
  _expect_shape("gemm2_weights_scale", gemm2_weights_scale, (num_local, hidden // block, intermediate // block),
                f"[E_local, H/{block}, I/{block}]")

  _expect_dtype("hidden_states", hidden_states, [_FP8])
  _expect_dtype("hidden_states_scale", hidden_states_scale, [_F32])
  _expect_dtype("gemm1_weights", gemm1_weights, [_FP8])
  _expect_dtype("gemm1_weights_scale", gemm1_weights_scale, [_F32])
  _expect_dtype("gemm2_weights", gemm2_weights, [_FP8])
  _expect_dtype("gemm2_weights_scale", gemm2_weights_scale, [_F32])
  return hidden, num_local, intermediate


def validate_plan(plan, *, num_tokens: int, num_local_experts: int):
  """A RoutingPlan must come from plan_local over these T tokens and E_local experts."""
  top_k = _shape(plan.pair_rows)[1] if len(_shape(plan.pair_rows)) == 2 else None
  _expect_shape("plan.pair_rows", plan.pair_rows, (num_tokens, top_k), "[T, top_k], T from hidden_states")
  _expect_shape("plan.group_sizes", plan.group_sizes, (num_local_experts,), "[E_local], E_local from gemm1_weights")
  _expect_shape("plan.token_ids", plan.token_ids, (num_tokens * top_k,), "[T * top_k]")


def check_local_expert_range(local_expert_offset, *, num_local_experts: int, num_experts: int,
                             owner: str = "the layer's", error: type[Exception] = ValueError):
  """Experts offset .. offset + E_local - 1 must be global experts: 1 <= E_local <= E, 0 <= offset <= E - E_local.

  The one range check of the project (layer, checkpoint loader, Flax module, test inputs). A jax.Array or
  traced offset is not read (see `concrete_value`) and passes unchecked.

  Args:
    local_expert_offset: global id of local expert 0 (an int, a NumPy scalar, or a jax.Array: unchecked).
    num_local_experts: E_local.
    num_experts: E.
    owner: whose experts, for the message ("the checkpoint's").
    error: the exception type to raise (a ValueError subclass, e.g. the loader's CheckpointError).

  Raises:
    `error`, naming the expected range and the value received.
  """
  if not 1 <= num_local_experts <= num_experts:
    raise error(f"num_local_experts must be in [1, {num_experts}] (E = {num_experts}), got {num_local_experts}")
  offset = concrete_value(local_expert_offset)
  if offset is None:
    return
  offset = int(offset)
  highest = num_experts - num_local_experts
  if not 0 <= offset <= highest:
    raise error(f"local_expert_offset must be in [0, {highest}] (E - E_local = {num_experts} - {num_local_experts}), "
                f"got {offset}: experts {offset} .. {offset + num_local_experts - 1} are not inside {owner} "
                f"{num_experts} experts")


def validate_scalars(*, local_expert_offset, routed_scaling_factor, config: MoEConfig):
  """Scalar arguments: shape and dtype always; range and finiteness only when concrete."""
  if _shape(local_expert_offset) != ():
    raise ValueError(f"local_expert_offset must be a scalar, got shape {list(_shape(local_expert_offset))}")
  if not jnp.issubdtype(_dtype(local_expert_offset), jnp.integer):
    raise TypeError(f"local_expert_offset must be an integer, got dtype {_dtype(local_expert_offset).name}")
  if _shape(routed_scaling_factor) != ():
    raise ValueError(f"routed_scaling_factor must be a scalar, got shape {list(_shape(routed_scaling_factor))}")
  if not (jnp.issubdtype(_dtype(routed_scaling_factor), jnp.floating)
          or jnp.issubdtype(_dtype(routed_scaling_factor), jnp.integer)):
    raise TypeError(f"routed_scaling_factor must be a real number, got dtype {_dtype(routed_scaling_factor).name}")

  check_local_expert_range(local_expert_offset, num_local_experts=config.num_local_experts,
                           num_experts=config.num_experts)
  factor = concrete_value(routed_scaling_factor)
  if factor is not None and not math.isfinite(float(factor)):
    raise ValueError(f"routed_scaling_factor must be finite, got {float(factor)}")


def validate_intermediate_dtype(intermediate_dtype):
  """The SwiGLU output's precision on the kernel path: float8_e4m3fn or bfloat16."""
  if jnp.dtype(intermediate_dtype) not in (_FP8, jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"intermediate_dtype must be float8_e4m3fn or bfloat16, got {jnp.dtype(intermediate_dtype).name}")
  return jnp.dtype(intermediate_dtype)
