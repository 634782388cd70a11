"""Every input error at the public boundary, with its message: the argument, what was expected, what came."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_pallas import DEEPSEEK_V3, MoEConfig, moe_layer
from moe_pallas.testing import random_layer_inputs, seed_of

CONFIG = MoEConfig.small()  # H=256, I=128, E=32, E_local=8: H/128 = 2, 2I/128 = 2, I/128 = 1
T = 3
FP8, F32, BF16 = jnp.float8_e4m3fn, jnp.float32, jnp.bfloat16


@pytest.fixture(scope="module")
def inputs():
  return random_layer_inputs(CONFIG, T, seed=seed_of(__name__), local_expert_offset=8)._asdict()


def _call(inputs, *, local_expert_offset=8, routed_scaling_factor=2.5, config=CONFIG, **kwargs):
  return moe_layer(*inputs.values(), local_expert_offset=local_expert_offset,
                   routed_scaling_factor=routed_scaling_factor, config=config, **kwargs)


def _replace(inputs, **changes):
  return {**inputs, **changes}


def _raises(error, message, inputs, **kwargs):
  with pytest.raises(error, match=re.escape(message)) as info:
    _call(inputs, **kwargs)
  print(f"{error.__name__}: {info.value}")


def _random(shape, dtype, seed=0):
  """Non-zero filler of a given shape and dtype, for arguments whose shape or dtype is the error."""
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return jnp.asarray(x).astype(dtype)


def test_valid_inputs_pass(inputs):
  out = _call(inputs)
  assert out.shape == (T, CONFIG.hidden) and out.dtype == BF16


@pytest.mark.parametrize("name,bad,message", [
    ("routing_logits", (T, CONFIG.num_experts, 1), "routing_logits must have rank 2 ([T, E]), got shape [3, 32, 1]"),
    ("hidden_states", (T * CONFIG.hidden,), "hidden_states must have rank 2 ([T, H]), got shape [768]"),
    ("gemm1_weights", (8 * 256, 256), "gemm1_weights must have rank 3 ([E_local, 2I, H]) or be block-major (rank 5, "
                                      "[E_local, N/128, K/128, 128, 128]: moe_pallas.weight_layout), got shape [2048, 256]"),
    ("gemm2_weights", (8, 256, 128, 1), "gemm2_weights must have rank 3 ([E_local, H, I]) or be block-major (rank 5, "
                                        "[E_local, N/128, K/128, 128, 128]: moe_pallas.weight_layout), got shape "
                                        "[8, 256, 128, 1]"),
])
def test_wrong_rank(inputs, name, bad, message):
  _raises(ValueError, message, _replace(inputs, **{name: _random(bad, inputs[name].dtype)}))


@pytest.mark.parametrize("name,bad,message", [
    ("routing_bias", (CONFIG.num_experts + 1,), "routing_bias must have shape [32] ([E]), got [33]"),
    ("routing_bias", (1, CONFIG.num_experts), "routing_bias must have shape [32] ([E]), got [1, 32]"),
    ("hidden_states", (T + 1, CONFIG.hidden), "hidden_states must have shape [3, 256] ([T, H], T from routing_logits), got [4, 256]"),
    ("gemm1_weights", (8, 256, 384), "gemm1_weights must have shape [8, 256, 256] ([E_local, 2I, H]), got [8, 256, 384]"),
    ("gemm1_weights_scale", (8, 2, 3), "gemm1_weights_scale must have shape [8, 2, 2] ([E_local, 2I/128, H/128]), got [8, 2, 3]"),
    ("gemm1_weights_scale", (8, 2), "gemm1_weights_scale must have shape [8, 2, 2] ([E_local, 2I/128, H/128]), got [8, 2]"),
    ("gemm2_weights", (7, 256, 128), "gemm2_weights must have shape [8, 256, 128] ([E_local, H, I]), got [7, 256, 128]"),
    ("gemm2_weights", (8, 256, 256), "gemm2_weights must have shape [8, 256, 128] ([E_local, H, I]), got [8, 256, 256]"),
    ("gemm2_weights_scale", (8, 1, 2), "gemm2_weights_scale must have shape [8, 2, 1] ([E_local, H/128, I/128]), got [8, 1, 2]"),
])
def test_wrong_shape(inputs, name, bad, message):
  _raises(ValueError, message, _replace(inputs, **{name: _random(bad, inputs[name].dtype)}))


def test_activation_scale_in_row_major_layout(inputs):
  # [T, H/128] instead of the public [H/128, T]: the message says which layout is expected.
  row_major = jnp.swapaxes(inputs["hidden_states_scale"], 0, 1)
  _raises(ValueError, "hidden_states_scale must have shape [2, 3] ([H/128, T]: the public layout is transposed, "
          "scale[b, t] multiplies hidden_states[t, b*128:(b+1)*128]), got [3, 2]",
          _replace(inputs, hidden_states_scale=row_major))


def test_activation_scale_t_by_56_at_deepseek_v3_shape():
  # The production shape, checked from shapes and dtypes alone (no 1.4 GB of weights needed).
  num_tokens, cfg = 7, DEEPSEEK_V3
  h, i, e, el = cfg.hidden, cfg.intermediate, cfg.num_experts, cfg.num_local_experts
  spec = jax.ShapeDtypeStruct
  args = [spec((num_tokens, e), F32), spec((e,), BF16), spec((num_tokens, h), FP8),
          spec((num_tokens, h // 128), F32),  # [T, 56]: the mistake
          spec((el, 2 * i, h), FP8), spec((el, 2 * i // 128, h // 128), F32),
          spec((el, h, i), FP8), spec((el, h // 128, i // 128), F32)]
  message = ("hidden_states_scale must have shape [56, 7] ([H/128, T]: the public layout is transposed, "
             "scale[b, t] multiplies hidden_states[t, b*128:(b+1)*128]), got [7, 56]")
  with pytest.raises(ValueError, match=re.escape(message)):
    moe_layer(*args, local_expert_offset=32, routed_scaling_factor=2.5)


@pytest.mark.parametrize("name,dtype,message", [
    ("routing_logits", BF16, "routing_logits must have dtype float32, got bfloat16"),
    ("routing_bias", jnp.float16, "routing_bias must have dtype bfloat16 or float32, got float16"),
    ("hidden_states", BF16, "hidden_states must have dtype float8_e4m3fn, got bfloat16"),
    ("hidden_states", jnp.float8_e5m2, "hidden_states must have dtype float8_e4m3fn, got float8_e5m2"),
    ("hidden_states_scale", BF16, "hidden_states_scale must have dtype float32, got bfloat16"),
    ("gemm1_weights", F32, "gemm1_weights must have dtype float8_e4m3fn, got float32"),
    ("gemm1_weights_scale", jnp.float16, "gemm1_weights_scale must have dtype float32, got float16"),
    ("gemm2_weights", jnp.int8, "gemm2_weights must have dtype float8_e4m3fn, got int8"),
    ("gemm2_weights_scale", BF16, "gemm2_weights_scale must have dtype float32, got bfloat16"),
])
def test_wrong_dtype(inputs, name, dtype, message):
  _raises(TypeError, message, _replace(inputs, **{name: inputs[name].astype(dtype)}))


@pytest.mark.parametrize("hidden,two_i,message", [
    (200, 256, "H (hidden_states.shape[1]) must be a positive multiple of 128, got 200"),
    (256, 192, "2I (gemm1_weights.shape[1]) must be a positive multiple of 128, got 192"),
    (256, 384, "I = gemm1_weights.shape[1] / 2 must be a multiple of 128, got 192"),
])
def test_sizes_not_multiple_of_128(inputs, hidden, two_i, message):
  bad = _replace(inputs, hidden_states=_random((T, hidden), FP8),
                 gemm1_weights=_random((CONFIG.num_local_experts, two_i, hidden), FP8))
  _raises(ValueError, message, bad)


@pytest.mark.parametrize("offset", [-1, CONFIG.num_experts - CONFIG.num_local_experts + 1, 10**6])
def test_offset_out_of_range(inputs, offset):
  _raises(ValueError, f"local_expert_offset must be in [0, 24] (E - E_local = 32 - 8), got {offset}", inputs,
          local_expert_offset=offset)


def test_offset_range_edges_pass(inputs):
  for offset in (0, CONFIG.num_experts - CONFIG.num_local_experts, np.int64(16), jnp.int32(3)):
    assert _call(inputs, local_expert_offset=offset).shape == (T, CONFIG.hidden)


@pytest.mark.parametrize("offset,error,message", [
    (8.0, TypeError, "local_expert_offset must be an integer, got dtype float64"),
    (np.array([8]), ValueError, "local_expert_offset must be a scalar, got shape [1]"),
])
def test_offset_not_an_int_scalar(inputs, offset, error, message):
  _raises(error, message, inputs, local_expert_offset=offset)


@pytest.mark.parametrize("factor", [float("inf"), float("-inf"), float("nan"), np.float32("nan")])
def test_non_finite_factor(inputs, factor):
  _raises(ValueError, f"routed_scaling_factor must be finite, got {float(factor)}", inputs,
          routed_scaling_factor=factor)


def test_device_array_scalars_are_not_read_on_the_host(inputs):
  """jax.Array offset/factor: no device-to-host copy per call, so no range check either (documented)."""
  offset, factor = jnp.int32(CONFIG.num_local_experts), jnp.float32(2.5)
  with jax.transfer_guard_device_to_host("disallow"):
    out = _call(inputs, local_expert_offset=offset, routed_scaling_factor=factor, implementation="xla")
  jax.block_until_ready(out)
  # Out of range, unchecked: selects no local expert, as a traced offset would.
  far = _call(inputs, local_expert_offset=jnp.int32(CONFIG.num_experts), routed_scaling_factor=factor,
              implementation="xla")
  assert not np.asarray(far, np.float32).any()


@pytest.mark.parametrize("factor,error,message", [
    (np.array([2.5, 2.5]), ValueError, "routed_scaling_factor must be a scalar, got shape [2]"),
    (2.5 + 1j, TypeError, "routed_scaling_factor must be a real number, got dtype complex128"),
])
def test_factor_not_a_real_scalar(inputs, factor, error, message):
  _raises(error, message, inputs, routed_scaling_factor=factor)


def test_config_required_when_not_256_experts(inputs):
  _raises(ValueError, "config is required when routing_logits has E=32 experts: the routing constants "
          "(top_k, n_group, topk_group) default to DeepSeek-V3's (8, 8, 4) only for E=256", inputs, config=None)


@pytest.mark.parametrize("field,value,message", [
    ("hidden", 512, "config.hidden=512 does not match the inputs, whose shapes give hidden=256"),
    ("intermediate", 256, "config.intermediate=256 does not match the inputs, whose shapes give intermediate=128"),
    ("num_experts", 64, "config.num_experts=64 does not match the inputs, whose shapes give num_experts=32"),
    ("num_local_experts", 16,
     "config.num_local_experts=16 does not match the inputs, whose shapes give num_local_experts=8"),
])
def test_config_mismatch(inputs, field, value, message):
  kwargs = {**CONFIG.__dict__, field: value}
  _raises(ValueError, message, inputs, config=MoEConfig(**kwargs))


def test_config_wrong_type(inputs):
  _raises(TypeError, "config must be a moe_pallas.MoEConfig or None, got dict", inputs, config=dict(CONFIG.__dict__))


def test_bad_implementation_name(inputs):
  _raises(ValueError, "implementation must be one of ('xla', 'triton') or None, got 'cuda'", inputs,
          implementation="cuda")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU may run the triton implementation")
def test_triton_without_interpret_on_cpu(inputs):
  _raises(ValueError, "implementation='triton' needs an NVIDIA GPU of compute capability >= 8.9, but the default "
          "device is", inputs, implementation="triton")
  with pytest.raises(ValueError, match="pass interpret=True to run the kernels in interpret mode"):
    _call(inputs, implementation="triton")


def test_bad_intermediate_dtype(inputs):
  _raises(ValueError, "intermediate_dtype must be float8_e4m3fn or bfloat16, got float16", inputs,
          intermediate_dtype=jnp.float16)


@pytest.mark.parametrize("field,value,message", [
    ("hidden", 200, "hidden=200 and intermediate=128 must be multiples of block=128"),
    ("num_experts", 30, "num_experts=30 must be a multiple of n_group=4"),
    ("num_local_experts", 64, "num_local_experts=64 exceeds num_experts=32"),
    ("topk_group", 5, "topk_group=5 exceeds n_group=4"),
    ("top_k", 0, "MoEConfig.top_k must be a positive int, got 0"),
    ("top_k", 17, "top_k=17 exceeds the experts in the kept groups (2 x 8)"),
    ("n_group", 32, "needs >= 2 experts per group (the group score is a top-2 sum), got num_experts/n_group=1"),
])
def test_config_construction_errors(field, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    MoEConfig(**{**CONFIG.__dict__, field: value})


def test_apply_local_experts_checks_the_plan_against_the_arrays(inputs):
  from moe_pallas import apply_local_experts, plan_local, route
  ids, weights = route(inputs["routing_logits"], inputs["routing_bias"], config=CONFIG, routed_scaling_factor=2.5)
  arrays = [inputs[k] for k in ("hidden_states", "hidden_states_scale", "gemm1_weights", "gemm1_weights_scale",
                                "gemm2_weights", "gemm2_weights_scale")]
  fewer_tokens = plan_local(ids[:-1], weights[:-1], local_expert_offset=8, num_local_experts=CONFIG.num_local_experts)
  with pytest.raises(ValueError, match=re.escape(f"plan.pair_rows must have shape [{T}, {CONFIG.top_k}]")):
    apply_local_experts(*arrays, fewer_tokens, implementation="xla")
  other_experts = plan_local(ids, weights, local_expert_offset=8, num_local_experts=CONFIG.num_local_experts - 1)
  with pytest.raises(ValueError, match=re.escape(f"plan.group_sizes must have shape [{CONFIG.num_local_experts}]")):
    apply_local_experts(*arrays, other_experts, implementation="xla")


def test_route_checks_experts_against_config(inputs):
  from moe_pallas import route
  with pytest.raises(ValueError, match="routing_logits has E=16 experts, config.num_experts=32"):
    route(inputs["routing_logits"][:, :16], inputs["routing_bias"][:16], config=CONFIG, routed_scaling_factor=2.5)


# ---- the public pieces: route, plan_local, apply_local_experts; the config's block ---------------------------

def _routed(inputs):
  from moe_pallas import route
  return route(inputs["routing_logits"], inputs["routing_bias"], config=CONFIG, routed_scaling_factor=2.5)


def _expert_arrays(inputs):
  return [inputs[k] for k in ("hidden_states", "hidden_states_scale", "gemm1_weights", "gemm1_weights_scale",
                              "gemm2_weights", "gemm2_weights_scale")]


@pytest.mark.parametrize("change,error,message", [
    (dict(routing_bias=_random((CONFIG.num_experts - 1,), F32)), ValueError,
     "routing_bias must have shape [32] ([E], E from routing_logits), got [31]"),
    (dict(routing_bias=_random((CONFIG.num_experts,), jnp.float16)), TypeError,
     "routing_bias must have dtype bfloat16 or float32, got float16"),
    (dict(routing_logits=_random((T, CONFIG.num_experts, 1), F32)), ValueError,
     "routing_logits must have rank 2 ([T, E]), got shape [3, 32, 1]"),
    (dict(routing_logits=np.ones((T, CONFIG.num_experts), np.int32)), TypeError,
     "routing_logits must have a floating (float32) dtype, got int32"),
    (dict(config=None), TypeError, "config must be a moe_pallas.MoEConfig, got NoneType"),
    (dict(routed_scaling_factor=np.array([2.5, 2.5])), ValueError,
     "routed_scaling_factor must be a scalar, got shape [2]"),
    (dict(routed_scaling_factor=float("nan")), ValueError, "routed_scaling_factor must be finite, got nan"),
])
def test_route_rejects(inputs, change, error, message):
  from moe_pallas import route
  args = dict(routing_logits=inputs["routing_logits"], routing_bias=inputs["routing_bias"], config=CONFIG,
              routed_scaling_factor=2.5, **{})
  args.update(change)
  with pytest.raises(error, match=re.escape(message)) as info:
    route(args.pop("routing_logits"), args.pop("routing_bias"), **args)
  print(f"{error.__name__}: {info.value}")


@pytest.mark.parametrize("num_local_experts", [0, -1, 2.0, True])
def test_plan_local_rejects_non_positive_expert_count(inputs, num_local_experts):
  from moe_pallas import plan_local
  ids, weights = _routed(inputs)
  with pytest.raises(ValueError, match=re.escape(f"num_local_experts must be a positive int (E_local), got "
                                                 f"{num_local_experts!r}")):
    plan_local(ids, weights, local_expert_offset=8, num_local_experts=num_local_experts)


@pytest.mark.parametrize("which,error,message", [
    ("ids_rank", ValueError, "topk_ids must have rank 2 ([T, top_k]), got shape [12]"),
    ("ids_float", TypeError, "topk_ids must have an integer dtype, got float32"),
    ("weights_shape", ValueError, "topk_weights must have shape [3, 4] ([T, top_k], as topk_ids), got [3, 3]"),
    ("offset_float", TypeError, "local_expert_offset must be an integer, got dtype float64"),
])
def test_plan_local_rejects_bad_picks(inputs, which, error, message):
  from moe_pallas import plan_local
  ids, weights = _routed(inputs)
  offset = 8
  if which == "ids_rank":
    ids = ids.reshape(-1)
  elif which == "ids_float":
    ids = ids.astype(F32)
  elif which == "weights_shape":
    weights = weights[:, :3]
  else:
    offset = 8.0
  with pytest.raises(error, match=re.escape(message)):
    plan_local(ids, weights, local_expert_offset=offset, num_local_experts=CONFIG.num_local_experts)


@pytest.mark.parametrize("out_dtype", [jnp.int32, jnp.float16])
def test_apply_local_experts_rejects_out_dtype(inputs, out_dtype):
  from moe_pallas import apply_local_experts, plan_local
  ids, weights = _routed(inputs)
  plan = plan_local(ids, weights, local_expert_offset=8, num_local_experts=CONFIG.num_local_experts)
  with pytest.raises(ValueError, match=re.escape(f"out_dtype must be float32 or bfloat16, got "
                                                 f"{jnp.dtype(out_dtype).name}")):
    apply_local_experts(*_expert_arrays(inputs), plan, out_dtype=out_dtype, implementation="xla")


def test_apply_local_experts_accepts_both_out_dtypes(inputs):
  from moe_pallas import apply_local_experts, plan_local
  ids, weights = _routed(inputs)
  plan = plan_local(ids, weights, local_expert_offset=8, num_local_experts=CONFIG.num_local_experts)
  for out_dtype in (F32, BF16):
    out = apply_local_experts(*_expert_arrays(inputs), plan, out_dtype=out_dtype, implementation="xla")
    assert out.dtype == out_dtype and out.shape == (T, CONFIG.hidden)


def test_config_block_other_than_128_is_named(inputs):
  """MoEConfig.block: the layer runs 128 only, and says so (not blaming the inputs' shapes)."""
  _raises(ValueError, "config.block=64 is not supported: the layer (validation, kernels, checkpoint loader) uses "
          "128x128 weight tiles", inputs, config=MoEConfig(**{**CONFIG.__dict__, "block": 64}))


def test_local_expert_range_check():
  from moe_pallas.validation import check_local_expert_range
  check_local_expert_range(24, num_local_experts=8, num_experts=32)
  check_local_expert_range(jnp.int32(99), num_local_experts=8, num_experts=32)  # a jax.Array is not read
  with pytest.raises(ValueError, match=re.escape("local_expert_offset must be in [0, 24] (E - E_local = 32 - 8), "
                                                 "got 25: experts 25 .. 32 are not inside the layer's 32 experts")):
    check_local_expert_range(25, num_local_experts=8, num_experts=32)
  with pytest.raises(ValueError, match=re.escape("num_local_experts must be in [1, 32] (E = 32), got 0")):
    check_local_expert_range(0, num_local_experts=0, num_experts=32)
