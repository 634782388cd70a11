"""The one gate: each public entry checks its arguments here, once, and gets back what was checked.

The cores behind the entries (the jitted programs, the routing and plan cores, the per-shard program) take
the returned `Checked` as given and check nothing again. Every message names the argument, what was
expected and what came.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moe_pallas import weight_layout
from moe_pallas.config import SCALE_BLOCK, MoEConfig

IMPLEMENTATIONS = ("xla", "triton")
# FP8 wgmma / mma with e4m3 operands exists from Ada (8.9) and Hopper (9.0) on.
_MIN_TRITON_COMPUTE_CAPABILITY = (8, 9)

_FP8 = jnp.dtype(jnp.float8_e4m3fn)
_F32 = jnp.dtype(jnp.float32)
_BF16 = jnp.dtype(jnp.bfloat16)
_BIAS_DTYPES = (_BF16, _F32)


class Checked(NamedTuple):
  """What a public entry checked, handed to its core (hashable: it is the jitted program's static key).

  Attributes:
    config: the geometry (sizes from the shapes, routing constants from the config); None for
      `apply_local_experts`, which has no router.
    implementation: "xla" or "triton", resolved.
    fall_back: the caller asked for the best available (None): a case the kernels do not cover (they raise
      NotImplementedError while tracing) runs on "xla".
    interpret: run the Pallas kernels in interpret mode.
    intermediate_dtype: the SwiGLU output's precision on the kernel path.
    out_dtype: the output dtype.
  """

  config: MoEConfig | None
  implementation: str
  fall_back: bool
  interpret: bool
  intermediate_dtype: jnp.dtype
  out_dtype: jnp.dtype


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


def _expert_weights_shape(name, x, meaning) -> tuple[int, int, int]:
  """(E_local, N, K) of expert weights in SPEC.md's order (rank 3) or block-major ([E_local, N/128, K/128,
  128, 128], `moe_pallas.weight_layout`)."""
  shape = _shape(x)
  if weight_layout.is_block_major_shape(shape):
    return weight_layout.spec_shape(shape)
  if len(shape) != 3:
    raise ValueError(f"{name} must have rank 3 ({meaning}) or be block-major (rank 5, [E_local, N/{SCALE_BLOCK}, "
                     f"K/{SCALE_BLOCK}, {SCALE_BLOCK}, {SCALE_BLOCK}]: moe_pallas.weight_layout), got shape "
                     f"{list(shape)}")
  return shape


def _expect_logical_shape(name, x, logical, expected, meaning):
  if tuple(logical) != tuple(expected):
    order = " (block-major, read as [E_local, N, K])" if weight_layout.is_block_major_shape(_shape(x)) else ""
    raise ValueError(f"{name} must have shape {list(expected)} ({meaning}), got {list(logical)}{order}")


def _expect_kind(name, x, kind, meaning):
  if not jnp.issubdtype(_dtype(x), kind):
    raise TypeError(f"{name} must have {meaning} dtype, got {_dtype(x).name}")


def concrete_value(x):
  """The value of a Python or NumPy scalar, or None for a jax.Array (traced or not).

  A jax.Array is not read: np.asarray on it would copy it to the host and wait for the device, a sync
  on every call. Such values are documented as unchecked, like traced ones.
  """
  if isinstance(x, jax.Array):
    return None
  return np.asarray(x)


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


def _checked(config, *, implementation, interpret, intermediate_dtype, out_dtype) -> Checked:
  intermediate_dtype = jnp.dtype(intermediate_dtype)
  if intermediate_dtype not in (_FP8, _BF16):
    raise ValueError(f"intermediate_dtype must be float8_e4m3fn or bfloat16, got {intermediate_dtype.name}")
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (_F32, _BF16):
    raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype.name}")
  return Checked(config=config, implementation=resolve_implementation(implementation, interpret=interpret),
                 fall_back=implementation is None, interpret=bool(interpret), intermediate_dtype=intermediate_dtype,
                 out_dtype=out_dtype)


def _check_config_type(config, *, optional: bool):
  if config is None and optional:
    return
  if not isinstance(config, MoEConfig):
    allowed = "a moe_pallas.MoEConfig or None" if optional else "a moe_pallas.MoEConfig"
    raise TypeError(f"config must be {allowed}, got {type(config).__name__}")


def _check_config_block(config):
  if config is None:
    return
  # MoEConfig.block describes test data for the block-agnostic float64 oracle; the layer runs one block.
  if config.block != SCALE_BLOCK:
    raise ValueError(f"config.block={config.block} is not supported: the layer (validation, kernels, checkpoint "
                     f"loader) uses {SCALE_BLOCK}x{SCALE_BLOCK} weight tiles and 1x{SCALE_BLOCK} activation blocks")


def resolve_config(config, *, num_experts, hidden, intermediate, num_local_experts) -> MoEConfig:
  """Sizes come from the shapes; routing constants from `config`, or DeepSeek-V3's when E = 256."""
  if config is None:
    if num_experts != 256:
      raise ValueError(
          f"config is required when routing_logits has E={num_experts} experts: the routing constants "
          "(top_k, n_group, topk_group) default to DeepSeek-V3's (8, 8, 4) only for E=256")
    preset = MoEConfig.deepseek_v3()
    return MoEConfig(hidden=hidden, intermediate=intermediate, num_experts=num_experts,
                     num_local_experts=num_local_experts, top_k=preset.top_k, n_group=preset.n_group,
                     topk_group=preset.topk_group)
  given = dict(num_experts=num_experts, hidden=hidden, intermediate=intermediate,
               num_local_experts=num_local_experts)
  for field, value in given.items():
    if getattr(config, field) != value:
      raise ValueError(f"config.{field}={getattr(config, field)} does not match the inputs, whose shapes "
                       f"give {field}={value}")
  return config


def check_layer(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, local_expert_offset,
                routed_scaling_factor, config, implementation, interpret, intermediate_dtype,
                out_dtype=jnp.bfloat16, check_finite: bool = False) -> Checked:
  """`moe_layer`'s gate: ranks, shapes, dtypes, (when concrete) scalar values, implementation, flags."""
  if not isinstance(check_finite, bool):
    raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
  _check_config_type(config, optional=True)
  _check_config_block(config)
  _expect_rank("routing_logits", routing_logits, 2, "[T, E]")
  num_tokens, num_experts = _shape(routing_logits)
  _expect_rank("hidden_states", hidden_states, 2, "[T, H]")
  _expect_shape("hidden_states", hidden_states, (num_tokens, _shape(hidden_states)[1]),
                "[T, H], T from routing_logits")
  hidden, num_local, intermediate = check_expert_arrays(
      hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale)
  _expect_shape("routing_bias", routing_bias, (num_experts,), "[E]")
  _expect_dtype("routing_logits", routing_logits, [_F32])
  _expect_dtype("routing_bias", routing_bias, _BIAS_DTYPES)

  config = resolve_config(config, num_experts=num_experts, hidden=hidden, intermediate=intermediate,
                          num_local_experts=num_local)
  check_scalars(local_expert_offset=local_expert_offset, routed_scaling_factor=routed_scaling_factor,
                config=config)
  return _checked(config, implementation=implementation, interpret=interpret,
                  intermediate_dtype=intermediate_dtype, out_dtype=out_dtype)


def check_all_experts(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                      gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, routed_scaling_factor, config,
                      implementation, interpret, intermediate_dtype) -> Checked:
  """The gate of a layer over all E experts (offset 0, E_local = E): `moe_layer_sharded`, `moe_layer_all_experts`.

  `config.num_local_experts` is ignored (the caller sets E_local); the returned config has E_local = E.
  """
  _check_config_type(config, optional=True)
  for name, weights, spec in (("gemm1_weights", gemm1_weights, "[E, 2I, H]"),
                              ("gemm2_weights", gemm2_weights, "[E, H, I]")):
    if weight_layout.is_block_major_shape(_shape(weights)):
      raise ValueError(f"{name} is block-major ({list(_shape(weights))}); the layer over all E experts "
                       f"(moe_layer_sharded, moe_layer_all_experts) takes SPEC.md's {spec} order only: "
                       f"moe_pallas.from_block_major gives it")
  num_experts = _shape(routing_logits)[-1] if len(_shape(routing_logits)) == 2 else None
  if (len(_shape(gemm1_weights)) != 3 or num_experts is None or _shape(gemm1_weights)[0] != num_experts):
    raise ValueError(f"gemm1_weights must hold all E global experts, [E, 2I, H] with E = routing_logits.shape[1]; "
                     f"got gemm1_weights {list(_shape(gemm1_weights))} and routing_logits "
                     f"{list(_shape(routing_logits))}")
  if config is not None:
    config = config.with_local_experts(num_experts)
  return check_layer(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                     gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, local_expert_offset=0,
                     routed_scaling_factor=routed_scaling_factor, config=config, implementation=implementation,
                     interpret=interpret, intermediate_dtype=intermediate_dtype)


def check_apply_local_experts(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
                              gemm2_weights, gemm2_weights_scale, plan, *, out_dtype, implementation, interpret,
                              intermediate_dtype) -> Checked:
  """`apply_local_experts`' gate: the arrays, the plan against them, the dtypes, the implementation."""
  _, num_local, _ = check_expert_arrays(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
                                        gemm2_weights, gemm2_weights_scale)
  check_plan(plan, num_tokens=_shape(hidden_states)[0], num_local_experts=num_local)
  return _checked(None, implementation=implementation, interpret=interpret, intermediate_dtype=intermediate_dtype,
                  out_dtype=out_dtype)


def check_expert_arrays(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
                        gemm2_weights, gemm2_weights_scale) -> tuple[int, int, int]:
  """Ranks, shapes and dtypes of the activations and expert weights; returns (H, E_local, I)."""
  block = SCALE_BLOCK
  _expect_rank("hidden_states", hidden_states, 2, "[T, H]")
  gemm1_shape = _expert_weights_shape("gemm1_weights", gemm1_weights, "[E_local, 2I, H]")
  gemm2_shape = _expert_weights_shape("gemm2_weights", gemm2_weights, "[E_local, H, I]")
  num_tokens, hidden = _shape(hidden_states)
  num_local, two_i, _ = gemm1_shape
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
  _expect_logical_shape("gemm1_weights", gemm1_weights, gemm1_shape, (num_local, two_i, hidden), "[E_local, 2I, H]")
  _expect_shape("gemm1_weights_scale", gemm1_weights_scale, (num_local, two_i // block, hidden // block),
                f"[E_local, 2I/{block}, H/{block}]")
  _expect_logical_shape("gemm2_weights", gemm2_weights, gemm2_shape, (num_local, hidden, intermediate),
                        "[E_local, H, I]")
  _expect_shape("gemm2_weights_scale", gemm2_weights_scale, (num_local, hidden // block, intermediate // block),
                f"[E_local, H/{block}, I/{block}]")

  _expect_dtype("hidden_states", hidden_states, [_FP8])
  _expect_dtype("hidden_states_scale", hidden_states_scale, [_F32])
  _expect_dtype("gemm1_weights", gemm1_weights, [_FP8])
  _expect_dtype("gemm1_weights_scale", gemm1_weights_scale, [_F32])
  _expect_dtype("gemm2_weights", gemm2_weights, [_FP8])
  _expect_dtype("gemm2_weights_scale", gemm2_weights_scale, [_F32])
  return hidden, num_local, intermediate


def check_plan(plan, *, num_tokens: int, num_local_experts: int):
  """A RoutingPlan must come from plan_local over these T tokens and E_local experts."""
  top_k = _shape(plan.pair_rows)[1] if len(_shape(plan.pair_rows)) == 2 else None
  _expect_shape("plan.pair_rows", plan.pair_rows, (num_tokens, top_k), "[T, top_k], T from hidden_states")
  _expect_shape("plan.group_sizes", plan.group_sizes, (num_local_experts,), "[E_local], E_local from gemm1_weights")
  _expect_shape("plan.token_ids", plan.token_ids, (num_tokens * top_k,), "[T * top_k]")


def check_route(routing_logits, routing_bias, *, config, routed_scaling_factor) -> MoEConfig:
  """`route`'s gate: logits [T, E] of a float dtype, bias [E], a MoEConfig with this E, a real scalar factor."""
  _check_config_type(config, optional=False)
  _expect_rank("routing_logits", routing_logits, 2, "[T, E]")
  _expect_kind("routing_logits", routing_logits, jnp.floating, "a floating (float32)")
  num_experts = _shape(routing_logits)[1]
  if num_experts != config.num_experts:
    raise ValueError(f"routing_logits has E={num_experts} experts, config.num_experts={config.num_experts}")
  _expect_shape("routing_bias", routing_bias, (num_experts,), "[E], E from routing_logits")
  _expect_dtype("routing_bias", routing_bias, _BIAS_DTYPES)
  _check_factor(routed_scaling_factor)
  return config


def check_plan_local(topk_ids, topk_weights, *, local_expert_offset, num_local_experts):
  """`plan_local`'s gate. The offset's value is not range-checked: out of range selects fewer experts (documented)."""
  if isinstance(num_local_experts, bool) or not isinstance(num_local_experts, (int, np.integer)) \
      or num_local_experts <= 0:
    raise ValueError(f"num_local_experts must be a positive int (E_local), got {num_local_experts!r}")
  _expect_rank("topk_ids", topk_ids, 2, "[T, top_k]")
  _expect_kind("topk_ids", topk_ids, jnp.integer, "an integer")
  _expect_shape("topk_weights", topk_weights, _shape(topk_ids), "[T, top_k], as topk_ids")
  _expect_kind("topk_weights", topk_weights, jnp.floating, "a floating (float32)")
  _check_offset_type(local_expert_offset)


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


def _check_offset_type(local_expert_offset):
  if _shape(local_expert_offset) != ():
    raise ValueError(f"local_expert_offset must be a scalar, got shape {list(_shape(local_expert_offset))}")
  if not jnp.issubdtype(_dtype(local_expert_offset), jnp.integer):
    raise TypeError(f"local_expert_offset must be an integer, got dtype {_dtype(local_expert_offset).name}")


def _check_factor(routed_scaling_factor):
  """A real scalar; finite when concrete (a traced or jax.Array factor is not read)."""
  if _shape(routed_scaling_factor) != ():
    raise ValueError(f"routed_scaling_factor must be a scalar, got shape {list(_shape(routed_scaling_factor))}")
  if not (jnp.issubdtype(_dtype(routed_scaling_factor), jnp.floating)
          or jnp.issubdtype(_dtype(routed_scaling_factor), jnp.integer)):
    raise TypeError(f"routed_scaling_factor must be a real number, got dtype {_dtype(routed_scaling_factor).name}")
  factor = concrete_value(routed_scaling_factor)
  if factor is not None and not math.isfinite(float(factor)):
    raise ValueError(f"routed_scaling_factor must be finite, got {float(factor)}")


def check_scalars(*, local_expert_offset, routed_scaling_factor, config: MoEConfig):
  """The layer's scalars: shape and dtype always; range and finiteness only when concrete."""
  _check_offset_type(local_expert_offset)
  _check_factor(routed_scaling_factor)
  check_local_expert_range(local_expert_offset, num_local_experts=config.num_local_experts,
                           num_experts=config.num_experts)
