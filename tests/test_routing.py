"""DeepSeek grouped routing (`route`) against the float64 oracle, and the local plan's invariants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_pallas import DEEPSEEK_V3, SMALL, MoEConfig, plan_local, route
from moe_pallas.testing.oracle import oracle_route

CONFIGS = {
    "deepseek_v3": DEEPSEEK_V3,                                    # E=256, 8 groups keep 4, top-8
    "small": SMALL,                                                # E=32, 4 groups keep 2, top-4
    "e64_g8_k3_top6": MoEConfig(hidden=128, intermediate=128, num_experts=64, num_local_experts=16, top_k=6,
                                n_group=8, topk_group=3),
    "e16_g2_k1_top2": MoEConfig(hidden=128, intermediate=128, num_experts=16, num_local_experts=4, top_k=2,
                                n_group=2, topk_group=1),
    "e8_g1_top3": MoEConfig(hidden=128, intermediate=128, num_experts=8, num_local_experts=8, top_k=3, n_group=1,
                            topk_group=1),
}
FACTOR = 2.5


def _logits_and_bias(rng, num_tokens, num_experts, *, bias_dtype=np.float32):
  logits = rng.standard_normal((num_tokens, num_experts)).astype(np.float32)
  bias = (0.1 * rng.standard_normal(num_experts)).astype(np.float32)
  return jnp.asarray(logits), jnp.asarray(bias).astype(bias_dtype)


_route_jit = jax.jit(route, static_argnames="config")
_plan_jit = jax.jit(plan_local, static_argnames="num_local_experts")


def _route(logits, bias, config, factor=FACTOR):
  ids, weights = _route_jit(logits, bias, config=config, routed_scaling_factor=factor)
  return np.asarray(ids), np.asarray(weights)


def _oracle(logits, bias, config, factor=FACTOR):
  ids, weights = oracle_route(np.asarray(logits), np.asarray(bias.astype(jnp.float32)),
                              routed_scaling_factor=factor, top_k=config.top_k, n_group=config.n_group,
                              topk_group=config.topk_group)
  return np.asarray(ids), np.asarray(weights, np.float64)


def _assert_same_selection(ids, weights, want_ids, want_weights, rtol=2e-6):
  """Same expert set per token (order within a token is not part of the contract), same weight per expert."""
  order, want_order = np.argsort(ids, axis=1), np.argsort(want_ids, axis=1)
  got_ids, want_ids = np.take_along_axis(ids, order, 1), np.take_along_axis(want_ids, want_order, 1)
  flipped = np.flatnonzero(np.any(got_ids != want_ids, axis=1))
  assert flipped.size == 0, f"{flipped.size} tokens route differently, first {flipped[:5]}"
  np.testing.assert_allclose(np.take_along_axis(weights, order, 1), np.take_along_axis(want_weights, want_order, 1),
                             rtol=rtol, atol=0)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_route_matches_oracle(config_name, seed):
  """Many seeds and token counts per config, float32 and bfloat16 bias; one compiled program per shape."""
  config = CONFIGS[config_name]
  # 1500 tokens: route switches top-k algorithms at large T (moe_pallas.routing); both must agree.
  for num_tokens, seeds in ((1, 6), (7, 6), (200, 6), (1500, 1)):
    for case in range(seeds):
      rng = np.random.default_rng((seed, num_tokens, case))
      logits, bias = _logits_and_bias(rng, num_tokens, config.num_experts,
                                      bias_dtype=[np.float32, jnp.bfloat16][case % 2])
      ids, weights = (np.asarray(x) for x in _route_jit(logits, bias, config=config, routed_scaling_factor=FACTOR))
      assert ids.shape == (num_tokens, config.top_k) and ids.dtype == np.int32
      assert weights.shape == (num_tokens, config.top_k) and weights.dtype == np.float32
      assert np.all(np.sort(ids, 1)[:, 1:] != np.sort(ids, 1)[:, :-1]), "an expert picked twice"
      np.testing.assert_allclose(weights.sum(1), FACTOR, rtol=1e-5)
      _assert_same_selection(ids, weights, *_oracle(logits, bias, config))


def test_route_picks_descending_biased_score(rng):
  logits, bias = _logits_and_bias(rng, 32, DEEPSEEK_V3.num_experts)
  ids, _ = _route(logits, bias, DEEPSEEK_V3)
  biased = np.asarray(jax.nn.sigmoid(logits)) + np.asarray(bias)[None]
  picked = np.take_along_axis(biased, ids, 1)
  assert np.all(picked[:, :-1] >= picked[:, 1:])


@pytest.mark.parametrize("config_name", ["deepseek_v3", "small"])
@pytest.mark.parametrize("num_tokens", [3, 1500])  # both top-k algorithms (small and large T)
def test_all_equal_scores_go_to_the_lowest_indices(config_name, num_tokens):
  config = CONFIGS[config_name]
  logits = jnp.full((num_tokens, config.num_experts), 0.3, jnp.float32)
  bias = jnp.full((config.num_experts,), 0.01, jnp.float32)
  ids, weights = _route(logits, bias, config)
  # Equal group scores keep groups 0 .. topk_group - 1; equal expert scores then take the lowest ids.
  np.testing.assert_array_equal(ids, np.tile(np.arange(config.top_k), (num_tokens, 1)))
  np.testing.assert_allclose(weights, FACTOR / config.top_k, rtol=1e-6)
  _assert_same_selection(ids, weights, *_oracle(logits, bias, config))


def test_tie_at_the_cut_goes_to_the_lower_index(rng):
  config = CONFIGS["e8_g1_top3"]  # one group: a plain top-3 over 8 experts
  logits = np.array([[0.0, 2.0, -1.0, 1.0, 3.0, 1.0, -2.0, 1.0]], np.float32)  # 1.0 at 3, 5, 7 ties for third
  ids, _ = _route(jnp.asarray(logits), jnp.full((8,), 0.01, jnp.float32), config)
  np.testing.assert_array_equal(ids[0], [4, 1, 3])
  # The same tie between groups: group 1 (experts 8..15) and group 0 score equal; group 0 is kept.
  config = CONFIGS["e16_g2_k1_top2"]
  group = rng.permutation(np.linspace(-1, 1, 8).astype(np.float32))
  logits = np.concatenate([group, rng.permutation(group)])[None]
  ids, _ = _route(jnp.asarray(logits), jnp.full((16,), 0.05, jnp.float32), config)
  assert set(ids[0]) == set(np.argsort(-group, kind="stable")[:2])


@pytest.mark.parametrize("config_name,num_tokens", [("deepseek_v3", 5), ("small", 5), ("e64_g8_k3_top6", 5),
                                                     ("deepseek_v3", 1100)])
def test_all_groups_equal(rng, config_name, num_tokens):
  """Every group holds the same scores (permuted): group scores tie exactly, so the lowest groups are kept."""
  config = CONFIGS[config_name]
  size = config.experts_per_group
  pattern = rng.standard_normal(size).astype(np.float32)
  logits = np.stack([np.concatenate([rng.permutation(pattern) for _ in range(config.n_group)])
                     for _ in range(num_tokens)])
  bias = jnp.full((config.num_experts,), -0.02, jnp.float32)
  ids, weights = _route(jnp.asarray(logits), bias, config)
  kept = ids // size
  assert np.all(kept < config.topk_group), f"picked from groups {np.unique(kept)} with all groups tied"
  _assert_same_selection(ids, weights, *_oracle(jnp.asarray(logits), bias, config))


def test_group_score_is_the_top2_sum():
  # Group 0 has the best single expert, group 1 the best pair: group 1 is kept (topk_group = 1).
  config = CONFIGS["e16_g2_k1_top2"]
  logits = np.full((1, 16), -4.0, np.float32)
  logits[0, 0] = 4.0
  logits[0, 8:10] = 2.0
  ids, weights = _route(jnp.asarray(logits), jnp.full((16,), 0.01, jnp.float32), config)
  np.testing.assert_array_equal(np.sort(ids[0]), [8, 9])
  np.testing.assert_allclose(weights[0], FACTOR / 2, rtol=1e-6)


def test_bias_changes_selection_not_weights(rng):
  config = DEEPSEEK_V3
  logits, _ = _logits_and_bias(rng, 16, config.num_experts)
  unbiased_ids, _ = _route(logits, jnp.full((config.num_experts,), 0.01, jnp.float32), config)
  # Promote experts that the unbiased routing did not take: the picks move to them.
  bias = np.zeros(config.num_experts, np.float32)
  promoted = rng.choice(np.setdiff1d(np.arange(config.num_experts), unbiased_ids), size=8, replace=False)
  bias[promoted] = 2.0
  bias += (0.01 * rng.standard_normal(config.num_experts)).astype(np.float32)
  ids, weights = _route(logits, jnp.asarray(bias), config)
  changed = np.any(np.sort(ids, 1) != np.sort(unbiased_ids, 1), axis=1)
  assert changed.mean() > 0.5, "the bias should change most tokens' selection"
  # Weights come from the unbiased sigmoid of what was picked, normalized over the picks.
  s = np.asarray(jax.nn.sigmoid(logits))
  picked = np.take_along_axis(s, ids, 1)
  np.testing.assert_allclose(weights, picked / picked.sum(1, keepdims=True) * FACTOR, rtol=1e-6)
  _assert_same_selection(ids, weights, *_oracle(logits, jnp.asarray(bias), config))


def test_bf16_bias_is_used_as_float32(rng):
  logits, bias = _logits_and_bias(rng, 16, DEEPSEEK_V3.num_experts, bias_dtype=jnp.bfloat16)
  a = _route(logits, bias, DEEPSEEK_V3)
  b = _route(logits, bias.astype(jnp.float32), DEEPSEEK_V3)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_scaling_factor_is_linear(rng):
  logits, bias = _logits_and_bias(rng, 9, SMALL.num_experts)
  ids1, w1 = _route(logits, bias, SMALL, factor=1.0)
  ids2, w2 = _route(logits, bias, SMALL, factor=2.5)
  np.testing.assert_array_equal(ids1, ids2)
  np.testing.assert_allclose(w2, 2.5 * w1, rtol=1e-6)
  np.testing.assert_allclose(w1.sum(1), 1.0, rtol=1e-6)


def test_route_jit_and_vmap(rng):
  logits = jnp.asarray(rng.standard_normal((3, 10, SMALL.num_experts)).astype(np.float32))
  bias = jnp.asarray((0.1 * rng.standard_normal(SMALL.num_experts)).astype(np.float32))
  factors = jnp.asarray([1.0, 2.5, 0.5], jnp.float32)
  fn = functools.partial(route, config=SMALL)
  jitted = jax.jit(lambda x, b, f: fn(x, b, routed_scaling_factor=f))
  batched = jax.jit(jax.vmap(lambda x, f: fn(x, bias, routed_scaling_factor=f)))(logits, factors)
  for i in range(3):
    eager = fn(logits[i], bias, routed_scaling_factor=factors[i])
    traced = jitted(logits[i], bias, factors[i])
    for got in (traced, (batched[0][i], batched[1][i])):
      np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(eager[0]))
      np.testing.assert_allclose(np.asarray(got[1]), np.asarray(eager[1]), rtol=1e-6)


def test_route_zero_tokens():
  ids, weights = _route(jnp.ones((0, SMALL.num_experts), jnp.float32), jnp.ones(SMALL.num_experts), SMALL)
  assert ids.shape == (0, SMALL.top_k) and weights.shape == (0, SMALL.top_k)


# --- plan_local -------------------------------------------------------------------------------------------


def _check_plan(plan, ids, weights, offset, num_local):
  """Every invariant RoutingPlan promises, against a plain NumPy recount of the picks."""
  ids, weights = np.asarray(ids), np.asarray(weights)
  num_tokens, top_k = ids.shape
  capacity = num_tokens * top_k
  token_ids, expert_ids = np.asarray(plan.token_ids), np.asarray(plan.expert_ids)
  plan_weights, pair_rows = np.asarray(plan.weights), np.asarray(plan.pair_rows)
  group_sizes, group_offsets = np.asarray(plan.group_sizes), np.asarray(plan.group_offsets)
  num_valid = int(plan.num_valid)
  assert plan.capacity == capacity and plan.num_local_experts == num_local
  assert token_ids.shape == expert_ids.shape == plan_weights.shape == (capacity,)
  assert pair_rows.shape == (num_tokens, top_k) and group_offsets.shape == (num_local + 1,)
  for arr in (token_ids, expert_ids, group_sizes, group_offsets, pair_rows):
    assert arr.dtype == np.int32
  assert plan_weights.dtype == np.float32

  local = ids - offset
  is_local = (local >= 0) & (local < num_local)
  np.testing.assert_array_equal(group_sizes, np.bincount(local[is_local], minlength=num_local))
  np.testing.assert_array_equal(group_offsets, np.concatenate([[0], np.cumsum(group_sizes)]))
  assert num_valid == group_offsets[-1] == is_local.sum()

  # Sorted by local expert, token order within an expert, padding last.
  assert np.all(np.diff(expert_ids) >= 0)
  for e in range(num_local):
    rows = slice(group_offsets[e], group_offsets[e + 1])
    assert np.all(expert_ids[rows] == e)
    assert np.all(np.diff(token_ids[rows]) > 0), "a token appears twice for one expert or out of order"
  assert np.all(expert_ids[num_valid:] == num_local)
  assert np.all(token_ids[num_valid:] == 0) and np.all(plan_weights[num_valid:] == 0)

  # pair_rows is a bijection from local picks onto rows [0, num_valid); non-local picks point past the end.
  assert np.all(pair_rows[~is_local] == capacity)
  rows = pair_rows[is_local]
  np.testing.assert_array_equal(np.sort(rows), np.arange(num_valid))
  t_idx, j_idx = np.nonzero(is_local)
  np.testing.assert_array_equal(token_ids[rows], t_idx)
  np.testing.assert_array_equal(expert_ids[rows], local[t_idx, j_idx])
  # Dropped, not renormalized: each local pick keeps exactly its routed weight.
  np.testing.assert_array_equal(plan_weights[rows], weights[t_idx, j_idx])


def _routed(rng, config, num_tokens):
  logits, bias = _logits_and_bias(rng, num_tokens, config.num_experts)
  return _route_jit(logits, bias, config=config, routed_scaling_factor=FACTOR)


@pytest.mark.parametrize("config_name", ["deepseek_v3", "small", "e64_g8_k3_top6"])
@pytest.mark.parametrize("num_tokens", [1, 5, 64, 300])
def test_plan_invariants(rng, config_name, num_tokens):
  config = CONFIGS[config_name]
  ids, weights = _routed(rng, config, num_tokens)
  num_local = config.num_local_experts
  for offset in sorted({0, num_local, config.num_experts - num_local, int(rng.integers(0, config.num_experts - num_local + 1))}):
    plan = _plan_jit(ids, weights, local_expert_offset=offset, num_local_experts=num_local)
    _check_plan(plan, ids, weights, offset, num_local)


def test_plan_non_local_picks_are_dropped_not_renormalized(rng):
  config = SMALL
  ids, weights = _routed(rng, config, 40)
  plan = plan_local(ids, weights, local_expert_offset=8, num_local_experts=8)
  is_local = (np.asarray(ids) >= 8) & (np.asarray(ids) < 16)
  assert 0 < is_local.sum() < is_local.size
  per_token = np.zeros(40, np.float64)
  np.add.at(per_token, np.asarray(plan.token_ids)[:int(plan.num_valid)], np.asarray(plan.weights)[:int(plan.num_valid)])
  np.testing.assert_allclose(per_token, np.where(is_local, np.asarray(weights), 0).sum(1), rtol=1e-6)
  partial = is_local.any(1) & ~is_local.all(1)
  assert np.all(per_token[partial] < FACTOR * (1 - 1e-6)), "local weights were renormalized"


def test_plan_handcrafted():
  ids = jnp.asarray([[5, 2, 9], [3, 2, 0], [7, 8, 1]], jnp.int32)
  weights = jnp.asarray([[0.5, 0.3, 0.2], [0.6, 0.25, 0.15], [0.4, 0.35, 0.25]], jnp.float32)
  plan = plan_local(ids, weights, local_expert_offset=2, num_local_experts=4)  # global experts 2, 3, 4, 5
  np.testing.assert_array_equal(plan.group_sizes, [2, 1, 0, 1])
  np.testing.assert_array_equal(plan.group_offsets, [0, 2, 3, 3, 4])
  assert int(plan.num_valid) == 4
  np.testing.assert_array_equal(plan.token_ids[:4], [0, 1, 1, 0])
  np.testing.assert_array_equal(plan.expert_ids, [0, 0, 1, 3] + [4] * 5)
  np.testing.assert_array_equal(plan.weights[:4], np.float32([0.3, 0.25, 0.6, 0.5]))
  np.testing.assert_array_equal(plan.pair_rows, [[3, 0, 9], [2, 1, 9], [9, 9, 9]])
  _check_plan(plan, ids, weights, 2, 4)


def test_plan_traced_offset_under_jit(rng):
  config = DEEPSEEK_V3
  ids, weights = _routed(rng, config, 33)
  for offset in (0, 32, 96, 224):
    traced = _plan_jit(ids, weights, local_expert_offset=jnp.int32(offset), num_local_experts=32)
    eager = plan_local(ids, weights, local_expert_offset=offset, num_local_experts=32)
    for got, want in zip(traced, eager):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _check_plan(traced, ids, weights, offset, 32)


@pytest.mark.parametrize("offset", [-1000, -32, 256, 10**6])
def test_plan_out_of_range_traced_offset_selects_nothing(rng, offset):
  ids, weights = _routed(rng, DEEPSEEK_V3, 20)
  plan = _plan_jit(
      ids, weights, local_expert_offset=jnp.int32(offset), num_local_experts=32)
  assert int(plan.num_valid) == 0
  assert np.all(np.asarray(plan.group_sizes) == 0) and np.all(np.asarray(plan.weights) == 0)
  assert np.all(np.asarray(plan.pair_rows) == plan.capacity)
  assert np.all(np.asarray(plan.expert_ids) == 32)


def test_plan_partly_out_of_range_offset_keeps_what_falls_inside(rng):
  ids, weights = _routed(rng, DEEPSEEK_V3, 64)
  offset = 256 - 8  # local experts 0..7 are global 248..255; 8..31 do not exist
  plan = _plan_jit(
      ids, weights, local_expert_offset=jnp.int32(offset), num_local_experts=32)
  _check_plan(plan, ids, weights, offset, 32)
  assert np.all(np.asarray(plan.group_sizes)[8:] == 0)


def test_plan_vmap_over_offsets(rng):
  """A sharded caller's view: one routing, one plan per rank's offset, batched."""
  ids, weights = _routed(rng, DEEPSEEK_V3, 17)
  offsets = jnp.arange(8, dtype=jnp.int32) * 32
  plans = jax.jit(jax.vmap(lambda off: plan_local(ids, weights, local_expert_offset=off, num_local_experts=32)))(offsets)
  total = 0
  for rank in range(8):
    plan = jax.tree_util.tree_map(lambda x: x[rank], plans)
    _check_plan(plan, ids, weights, rank * 32, 32)
    total += int(plan.num_valid)
  assert total == ids.size, "the 8 ranks together must hold every pick exactly once"


def test_plan_zero_tokens():
  plan = plan_local(jnp.ones((0, 8), jnp.int32), jnp.ones((0, 8), jnp.float32), local_expert_offset=0,
                    num_local_experts=32)
  assert plan.capacity == 0 and int(plan.num_valid) == 0 and plan.pair_rows.shape == (0, 8)
  np.testing.assert_array_equal(plan.group_offsets, np.zeros(33))
