"""Non-finite inputs: what each one does, on both implementations (README, "Non-finite inputs").

Routing is discrete, so a NaN in the router inputs must not silently pick other experts: the layer adds
`routing.nan_poison` to every output row (a NaN logit poisons its token's row, a NaN bias entry every row).
+-inf logits are valid inputs (the sigmoid saturates) and give finite output that matches the float64
oracle. NaN in activations or weights stays in the rows of the tokens that use them. Every case runs on the
"xla" path and on the kernels ("triton", interpret mode), and on the sharded layer (a 1-device mesh here;
tests/test_sharding.py covers more shards).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_pallas as mp
from moe_pallas import routing, testing
from moe_pallas.testing.oracle import oracle_moe, oracle_route

CONFIG = mp.SMALL  # H=256, I=128, E=32, E_local=8, top-4 of 4 groups (keep 2)
OFFSET = 8
FACTOR = 2.5
NUM_TOKENS = 24
IMPLEMENTATIONS = ["xla", "triton"]
# SPEC.md's project bounds against the float64 oracle: the xla path keeps the SwiGLU output in float32, the
# kernels re-quantize it to FP8 (1x128 blocks) before GEMM2.
REL_L2_BOUND = {"xla": 1e-2, "triton": 3.5e-2}


def _layer(inputs, implementation, offset=OFFSET):
  out = mp.moe_layer(*inputs, local_expert_offset=offset, routed_scaling_factor=FACTOR, config=CONFIG,
                     implementation=implementation, interpret=testing.interpret_mode())
  return np.asarray(out, np.float32)


def _local_rows(inputs, offset=OFFSET):
  """[T] bool: the token has at least one local pick (oracle routing, float32)."""
  ids, _ = oracle_route(inputs.routing_logits, inputs.routing_bias, top_k=CONFIG.top_k, n_group=CONFIG.n_group,
                        topk_group=CONFIG.topk_group, routed_scaling_factor=FACTOR)
  return ((ids >= offset) & (ids < offset + CONFIG.num_local_experts)).any(axis=1)


def _with(inputs, name, index, value):
  array = np.asarray(getattr(inputs, name)).copy()
  array[index] = value
  return inputs._replace(**{name: jnp.asarray(array, getattr(inputs, name).dtype)})


def _same_bits(a, b):
  return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


# ---- the poison vector ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_dtype", [jnp.float32, jnp.bfloat16])
def test_nan_poison_marks_nan_tokens_and_a_nan_bias(bias_dtype):
  logits = np.zeros((5, 8), np.float32)
  logits[1, 3] = np.nan
  logits[2, :] = np.inf
  logits[3, 0] = -np.inf
  bias = jnp.zeros((8,), bias_dtype)
  poison = jax.jit(routing.nan_poison)(jnp.asarray(logits), bias)
  assert poison.shape == (5,) and poison.dtype == jnp.float32
  np.testing.assert_array_equal(np.isnan(poison), [False, True, False, False, False])
  assert (np.asarray(poison)[~np.isnan(poison)] == 0).all()
  poisoned = routing.nan_poison(jnp.asarray(logits), bias.at[5].set(jnp.nan))
  assert np.isnan(poisoned).all()
  assert routing.nan_poison(jnp.zeros((0, 8)), bias).shape == (0,)


# ---- the layer, both implementations ---------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nan_logit_poisons_exactly_its_row(implementation, seed):
  inputs = testing.random_layer_inputs(CONFIG, NUM_TOKENS, seed=seed, local_expert_offset=OFFSET)
  local = _local_rows(inputs)
  assert local.any() and not local.all(), "the draw must mix tokens with and without local picks"
  with_local, without_local = int(np.argmax(local)), int(np.argmin(local))
  clean = _layer(inputs, implementation)
  # A NaN on a local expert of one token, on a non-local expert of another (a token whose own picks are
  # not local): both rows NaN, whatever the NaN would have done to the selection.
  poisoned = _with(inputs, "routing_logits", (with_local, OFFSET), np.nan)
  poisoned = _with(poisoned, "routing_logits", (without_local, 0), np.nan)
  out = _layer(poisoned, implementation)
  nan_rows = np.isnan(out).all(axis=1)
  np.testing.assert_array_equal(np.flatnonzero(nan_rows), sorted([with_local, without_local]))
  others = ~nan_rows
  assert not np.isnan(out[others]).any()
  assert _same_bits(out[others], clean[others]), "a NaN logit changed another token's row"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("bias_dtype", [jnp.bfloat16, jnp.float32])
def test_nan_bias_entry_poisons_every_row(implementation, bias_dtype, seed):
  inputs = testing.random_layer_inputs(CONFIG, NUM_TOKENS, seed=seed, local_expert_offset=OFFSET,
                                       bias_dtype=bias_dtype)
  # An expert that is neither local nor likely picked: the NaN still enters every token's selection.
  out = _layer(_with(inputs, "routing_bias", 30, np.nan), implementation)
  assert np.isnan(out).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_infinite_logits_are_valid(implementation, seed):
  inputs = testing.random_layer_inputs(CONFIG, NUM_TOKENS, seed=seed, scenario="skewed", local_expert_offset=OFFSET)
  logits = np.asarray(inputs.routing_logits).copy()
  rng = np.random.default_rng(seed)
  logits[0, :] = np.inf                                # every score saturates to 1: the bias decides
  logits[1, :] = -np.inf                               # every score 0: weights 0 / (0 + 1e-20) = 0
  logits[2, OFFSET:OFFSET + 4] = np.inf                # four local experts certain
  logits[3, :] = np.where(rng.random(CONFIG.num_experts) < 0.5, np.inf, -np.inf)
  scattered = rng.random(logits[4:].shape) < 0.1       # scattered +-inf among finite logits
  logits[4:][scattered] = np.where(rng.random(scattered.sum()) < 0.5, np.inf, -np.inf)
  inputs = inputs._replace(routing_logits=jnp.asarray(logits))
  out = _layer(inputs, implementation)
  assert np.isfinite(out).all()
  ref = oracle_moe(*inputs, local_expert_offset=OFFSET, routed_scaling_factor=FACTOR, top_k=CONFIG.top_k,
                   n_group=CONFIG.n_group, topk_group=CONFIG.topk_group)
  assert np.isfinite(ref).all() and np.abs(ref[2]).max() > 0
  metrics = testing.acceptance_metrics(out, ref)
  assert metrics["passed"] and metrics["rel_l2"] < REL_L2_BOUND[implementation], metrics
  assert not out[1].any(), "all -inf logits: zero routing weights, an all-zero row"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nan_activation_scale_stays_in_its_token(implementation, seed):
  inputs = testing.random_layer_inputs(CONFIG, NUM_TOKENS, seed=seed, local_expert_offset=OFFSET)
  local = _local_rows(inputs)
  with_local, without_local = int(np.argmax(local)), int(np.argmin(local))
  clean = _layer(inputs, implementation)
  poisoned = _with(inputs, "hidden_states_scale", (1, with_local), np.nan)  # [H/128, T]
  poisoned = _with(poisoned, "hidden_states_scale", (0, without_local), np.nan)
  out = _layer(poisoned, implementation)
  assert np.isnan(out[with_local]).all(), "a token with a local pick: its whole row is NaN"
  assert not out[without_local].any(), "a token with no local pick: still an all-zero row"
  others = np.ones(NUM_TOKENS, bool)
  others[[with_local, without_local]] = False
  assert _same_bits(out[others], clean[others])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nan_weight_scale_stays_in_the_rows_of_its_pickers(implementation, seed):
  inputs = testing.random_layer_inputs(CONFIG, NUM_TOKENS, seed=seed, scenario="skewed", local_expert_offset=OFFSET)
  ids, _ = oracle_route(inputs.routing_logits, inputs.routing_bias, top_k=CONFIG.top_k, n_group=CONFIG.n_group,
                        topk_group=CONFIG.topk_group, routed_scaling_factor=FACTOR)
  pickers_of = [(ids == OFFSET + e).any(axis=1) for e in range(CONFIG.num_local_experts)]
  expert = next(e for e, p in enumerate(pickers_of) if 0 < p.sum() < NUM_TOKENS)
  pickers = pickers_of[expert]
  clean = _layer(inputs, implementation)
  out = _layer(_with(inputs, "gemm2_weights_scale", (expert, 1, 0), np.nan), implementation)  # H rows 128..255
  assert np.isnan(out[pickers][:, 128:]).all() and not np.isnan(out[pickers][:, :128]).any()
  assert _same_bits(out[~pickers], clean[~pickers])


# ---- the other entries ------------------------------------------------------------------------------------------


def test_all_experts_and_sharded_layer_poison_like_moe_layer(seed):
  config = CONFIG.with_local_experts(CONFIG.num_experts)
  inputs = testing.random_layer_inputs(config, NUM_TOKENS, seed=seed)
  logits = np.asarray(inputs.routing_logits).copy()
  logits[5, 2] = np.nan
  logits[6, :] = np.inf
  poisoned = inputs._replace(routing_logits=jnp.asarray(logits))
  mesh = jax.make_mesh((1,), ("expert",))
  for strategy in ("all_gather", "all_to_all"):
    out = np.asarray(mp.moe_layer_sharded(*poisoned, mesh=mesh, routed_scaling_factor=FACTOR, config=config,
                                          strategy=strategy, implementation="xla"), np.float32)
    np.testing.assert_array_equal(np.flatnonzero(np.isnan(out).any(axis=1)), [5], err_msg=strategy)
    assert np.isnan(out[5]).all()
    out = np.asarray(mp.moe_layer_sharded(*_with(inputs, "routing_bias", 3, np.nan), mesh=mesh,
                                          routed_scaling_factor=FACTOR, config=config, strategy=strategy,
                                          implementation="xla"), np.float32)
    assert np.isnan(out).all(), strategy
  for experts_per_call in (8, 32):
    out = np.asarray(mp.moe_layer_all_experts(*poisoned, routed_scaling_factor=FACTOR, config=config,
                                              experts_per_call=experts_per_call, implementation="xla"), np.float32)
    np.testing.assert_array_equal(np.flatnonzero(np.isnan(out).any(axis=1)), [5])
    assert np.isnan(out[5]).all() and np.isfinite(np.delete(out, 5, axis=0)).all()


# ---- the opt-in check ----------------------------------------------------------------------------------------------


def _checked_layer(inputs, implementation):
  from jax.experimental import checkify
  layer = lambda *args: mp.moe_layer(*args, local_expert_offset=OFFSET, routed_scaling_factor=FACTOR, config=CONFIG,
                                     implementation=implementation, interpret=testing.interpret_mode(),
                                     check_finite=True)
  err, out = checkify.checkify(layer)(*inputs)
  return err.get(), np.asarray(out, np.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_check_finite_reports_each_non_finite_input(implementation, seed):
  inputs = testing.random_layer_inputs(CONFIG, NUM_TOKENS, seed=seed, local_expert_offset=OFFSET)
  error, out = _checked_layer(inputs, implementation)
  assert error is None
  assert _same_bits(out, _layer(inputs, implementation))  # the checks change nothing else
  for name, index, value, says in (("routing_logits", (3, 5), np.nan, "routing_logits holds a NaN"),
                                   ("routing_bias", 7, np.inf, "routing_bias holds a non-finite value"),
                                   ("hidden_states_scale", (1, 2), np.nan, "hidden_states_scale holds"),
                                   ("hidden_states", (4, 9), np.nan, "hidden_states holds a NaN"),
                                   ("gemm1_weights_scale", (2, 0, 1), -np.inf, "gemm1_weights_scale holds"),
                                   ("gemm2_weights_scale", (0, 1, 0), np.nan, "gemm2_weights_scale holds")):
    error, _ = _checked_layer(_with(inputs, name, index, value), implementation)
    flat = int(np.ravel_multi_index(index, np.shape(getattr(inputs, name)))) if isinstance(index, tuple) else index
    assert error is not None and says in error and f"first at flat index {flat}" in error, (name, error)
  # +-inf logits are valid (the sigmoid saturates): not an error.
  error, _ = _checked_layer(_with(inputs, "routing_logits", (0, 0), -np.inf), implementation)
  assert error is None


def test_check_finite_needs_checkify_and_a_bool(seed):
  inputs = testing.random_layer_inputs(CONFIG, 4, seed=seed, local_expert_offset=OFFSET)
  kwargs = dict(local_expert_offset=OFFSET, routed_scaling_factor=FACTOR, config=CONFIG, implementation="xla")
  with pytest.raises(ValueError, match="checkify"):
    mp.moe_layer(*inputs, check_finite=True, **kwargs)
  with pytest.raises(TypeError, match="check_finite must be a bool"):
    mp.moe_layer(*inputs, check_finite="yes", **kwargs)
