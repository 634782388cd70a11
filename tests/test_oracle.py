"""The float64 oracle against a brute-force loop, its routing on hand-made cases, and moe_pallas.testing."""

import math
import statistics

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moe_pallas import testing
from moe_pallas.config import MoEConfig
from moe_pallas.testing.oracle import oracle_moe, oracle_route

FACTOR = 2.5
SMALL = MoEConfig(hidden=256, intermediate=128, num_experts=32, num_local_experts=8, top_k=4, n_group=4,
                  topk_group=2)
# Smaller still, for the brute-force loop; block 64 checks that nothing assumes 128.
TINY = MoEConfig(hidden=128, intermediate=64, num_experts=16, num_local_experts=4, top_k=3, n_group=4,
                 topk_group=2, block=64)
DEEPSEEK_V3 = MoEConfig(hidden=7168, intermediate=2048, num_experts=256, num_local_experts=32, top_k=8,
                        n_group=8, topk_group=4)


def _constants(config):
  return dict(top_k=config.top_k, n_group=config.n_group, topk_group=config.topk_group)


def _route(inputs, config, factor=FACTOR):
  return oracle_route(inputs[0], inputs[1], routed_scaling_factor=factor, **_constants(config))


def _moe(inputs, config, offset, factor=FACTOR):
  return oracle_moe(*inputs, local_expert_offset=offset, routed_scaling_factor=factor, **_constants(config))


def _local_rows_per_expert(inputs, config, offset):
  ids, _ = _route(inputs, config)
  local = ids[(ids >= offset) & (ids < offset + config.num_local_experts)] - offset
  return np.bincount(local, minlength=config.num_local_experts)


# --- brute force: SPEC.md read literally, one token and one expert at a time ---------------------------------


def _brute_route_token(logits_row, bias, config):
  """SPEC.md steps 2-5 for one token with Python lists; float32 scalars for the selection."""
  f32 = np.float32
  s = [f32(1) / (f32(1) + np.exp(f32(-x))) for x in logits_row.astype(np.float32)]
  sb = [s[e] + f32(bias[e]) for e in range(len(s))]
  size = config.num_experts // config.n_group
  group_score = []
  for g in range(config.n_group):
    best = sorted(sb[g * size:(g + 1) * size], reverse=True)
    group_score.append(best[0] + best[1])
  kept = sorted(range(config.n_group), key=lambda g: (-group_score[g], g))[:config.topk_group]
  candidates = [e for e in range(config.num_experts) if e // size in kept]
  ids = sorted(candidates, key=lambda e: (-sb[e], e))[:config.top_k]
  total = sum(float(s[e]) for e in ids)
  return ids, [float(s[e]) / (total + 1e-20) * FACTOR for e in ids]


def _brute_moe(inputs, config, offset):
  logits, bias, hs, hs_scale, w13, w13_scale, w2, w2_scale = [np.asarray(x) for x in inputs]
  bias = bias.astype(np.float32)
  t_count, h = hs.shape
  i, b = config.intermediate, config.block
  out = np.zeros((t_count, h))
  for t in range(t_count):
    ids, weights = _brute_route_token(logits[t], bias, config)
    a = np.array([float(hs[t, k]) * float(hs_scale[k // b, t]) for k in range(h)])
    for e in range(config.num_experts):
      le = e - offset
      if e not in ids or not 0 <= le < config.num_local_experts:
        continue
      w13_f = np.kron(w13_scale[le].astype(np.float64), np.ones((b, b))) * w13[le].astype(np.float64)
      w2_f = np.kron(w2_scale[le].astype(np.float64), np.ones((b, b))) * w2[le].astype(np.float64)
      g = w13_f @ a
      x1, x2 = g[:i], g[i:]
      c = np.array([x1[n] * x2[n] * 0.5 * (1.0 + math.tanh(0.5 * x2[n])) for n in range(i)])
      out[t] += weights[ids.index(e)] * (w2_f @ c)
  return out


@pytest.mark.parametrize("offset", [0, 5, 12])
@pytest.mark.parametrize("scenario", ["uniform", "skewed"])
def test_oracle_matches_brute_force(offset, scenario, seed):
  inputs = testing.random_layer_inputs(TINY, 24, seed=seed, scenario=scenario, local_expert_offset=offset)
  want = _brute_moe(inputs, TINY, offset)
  got = _moe(inputs, TINY, offset)
  assert np.abs(want).max() > 0, "the draw should have local pairs"
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


def test_route_matches_brute_force(seed):
  inputs = testing.random_activations(SMALL, 200, seed=seed, scenario="uniform")
  ids, weights = _route(inputs, SMALL)
  logits, bias = np.asarray(inputs[0]), np.asarray(inputs[1]).astype(np.float32)
  for t in range(200):
    want_ids, want_weights = _brute_route_token(logits[t], bias, SMALL)
    assert ids[t].tolist() == want_ids, f"token {t}"
    np.testing.assert_allclose(weights[t], want_weights, rtol=1e-12)


# --- routing pitfalls on hand-made logits ----------------------------------------------------------------------


def _hand_config():
  # 8 experts in 4 groups of 2, keep 2 groups, top 2.
  return MoEConfig(hidden=128, intermediate=128, num_experts=8, num_local_experts=2, top_k=2, n_group=4,
                   topk_group=2)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_route_bias_selects_but_does_not_weigh(seed):
  config = _hand_config()
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(1, 8)) * 0.1 - 2.0).astype(np.float32)
  logits[0, [0, 1]] = [1.0, 0.8]  # group 0 by logits alone
  bias = np.zeros(8, np.float32) + rng.normal(size=8).astype(np.float32) * 1e-3
  bias[[6, 7]] = 2.0  # the bias moves selection to group 3
  bias[[4, 5]] = 1.5  # and group 2
  ids, weights = oracle_route(logits, bias, routed_scaling_factor=FACTOR, **_constants(config))
  assert sorted(ids[0].tolist()) == [6, 7]
  s = _sigmoid(logits[0, ids[0]])
  np.testing.assert_allclose(weights[0], s / s.sum() * FACTOR, rtol=1e-6)


def test_route_group_score_is_top2_sum(seed):
  config = _hand_config()
  rng = np.random.default_rng(seed)
  sb = np.array([0.97, 0.10, 0.60, 0.58, 0.62, 0.55, 0.20, 0.15]) + rng.uniform(0, 1e-3, 8)
  logits = np.log(sb / (1 - sb))[None, :].astype(np.float32)
  # Group scores (top-2 sums): 1.07, 1.18, 1.17, 0.35 -> keep groups 1 and 2. A top-1 group score would keep
  # group 0 (0.97), so expert 0 would be picked; with top-2 sums it must not be.
  ids, _ = oracle_route(logits, np.zeros(8, np.float32), routed_scaling_factor=FACTOR, **_constants(config))
  assert ids[0].tolist() == [4, 2]
  assert 0 not in ids[0]


def test_route_masks_dropped_groups(seed):
  config = _hand_config()
  rng = np.random.default_rng(seed)
  # Expert 1 is the single best expert overall, but its group's top-2 sum is the lowest.
  s = np.array([0.05, 0.99, 0.70, 0.71, 0.72, 0.73, 0.60, 0.61], np.float64) + rng.uniform(0, 1e-3, 8)
  logits = np.log(s / (1 - s))[None, :].astype(np.float32)
  ids, _ = oracle_route(logits, np.zeros(8, np.float32), routed_scaling_factor=FACTOR, **_constants(config))
  assert 1 not in ids[0]
  assert ids[0].tolist() == [5, 4]


def test_route_ties_prefer_lower_index(seed):
  config = _hand_config()
  value = np.random.default_rng(seed).normal()
  logits = np.full((3, 8), value, np.float32)
  bias = np.full(8, 0.01, np.float32)
  ids, weights = oracle_route(logits, bias, routed_scaling_factor=FACTOR, **_constants(config))
  assert ids.tolist() == [[0, 1]] * 3
  np.testing.assert_allclose(weights, FACTOR / 2)


def test_route_accepts_bfloat16_bias_and_jax_arrays(seed):
  inputs = testing.random_activations(SMALL, 50, seed=seed)
  logits, bias = inputs[0], inputs[1]
  assert bias.dtype == jnp.bfloat16
  ids_jax, w_jax = oracle_route(logits, bias, routed_scaling_factor=FACTOR, **_constants(SMALL))
  ids_np, w_np = oracle_route(np.asarray(logits), np.asarray(bias).astype(np.float32),
                              routed_scaling_factor=FACTOR, **_constants(SMALL))
  np.testing.assert_array_equal(ids_jax, ids_np)
  np.testing.assert_array_equal(w_jax, w_np)
  assert ids_np.shape == (50, SMALL.top_k) and w_np.dtype == np.float64
  np.testing.assert_allclose(w_np.sum(axis=1), FACTOR, rtol=1e-12)


# --- oracle_moe: layout, empty rows, extremes ------------------------------------------------------------------


def test_oracle_zero_rows_exactly_for_tokens_without_local_picks(seed):
  offset = 8
  inputs = testing.random_layer_inputs(SMALL, 64, seed=seed, local_expert_offset=offset)
  ids, _ = _route(inputs, SMALL)
  has_local = ((ids >= offset) & (ids < offset + SMALL.num_local_experts)).any(axis=1)
  assert has_local.any() and not has_local.all(), "uniform routing at T=64 should have both kinds of token"
  out = _moe(inputs, SMALL, offset)
  assert out.dtype == np.float64 and out.shape == (64, SMALL.hidden)
  assert np.all(out[~has_local] == 0)
  assert np.all(np.abs(out[has_local]).max(axis=1) > 0)


def test_oracle_no_local_and_zero_tokens(seed):
  inputs = testing.random_layer_inputs(SMALL, 16, seed=seed, scenario="no_local", local_expert_offset=16)
  assert np.all(_moe(inputs, SMALL, 16) == 0)
  empty = testing.random_layer_inputs(SMALL, 0, seed=seed)
  assert _moe(empty, SMALL, 0).shape == (0, SMALL.hidden)


def test_oracle_rejects_untransposed_activation_scale(seed):
  inputs = testing.random_layer_inputs(SMALL, 5, seed=seed)
  wrong = inputs._replace(hidden_states_scale=inputs.hidden_states_scale.T)  # [T, H/B] instead of [H/B, T]
  with pytest.raises(ValueError, match="hidden_states_scale"):
    _moe(wrong, SMALL, 0)


def test_oracle_activation_scale_is_per_token_and_block(seed):
  # Scaling scale[b, t] for one (b, t) must change only token t's contribution through block b.
  inputs = testing.random_layer_inputs(SMALL, 6, seed=seed, scenario="all_local")
  base = _moe(inputs, SMALL, 0)
  scale = np.asarray(inputs.hidden_states_scale).copy()
  scale[1, 3] *= 2.0
  changed = _moe(inputs._replace(hidden_states_scale=scale), SMALL, 0)
  differs = np.abs(changed - base).max(axis=1) > 0
  assert differs.tolist() == [False, False, False, True, False, False]


def test_oracle_large_magnitudes_stay_finite(seed):
  inputs = testing.random_layer_inputs(SMALL, 8, seed=seed, scenario="all_local")
  big = inputs._replace(gemm1_weights_scale=inputs.gemm1_weights_scale * 1e6,
                        hidden_states_scale=inputs.hidden_states_scale * 1e3)
  with np.errstate(invalid="raise"):
    out = _moe(big, SMALL, 0)
  assert np.isfinite(out).all() and np.abs(out).max() > 1e6


# --- moe_pallas.testing: shapes, distributions, determinism --------------------------------------------------


def test_inputs_shapes_dtypes_and_layout(seed):
  t = 5
  inputs = testing.random_layer_inputs(SMALL, t, seed=seed, local_expert_offset=8)
  h, i, b, e, el = SMALL.hidden, SMALL.intermediate, SMALL.block, SMALL.num_experts, SMALL.num_local_experts
  want = dict(routing_logits=((t, e), jnp.float32), routing_bias=((e,), jnp.bfloat16),
              hidden_states=((t, h), jnp.float8_e4m3fn), hidden_states_scale=((h // b, t), jnp.float32),
              gemm1_weights=((el, 2 * i, h), jnp.float8_e4m3fn),
              gemm1_weights_scale=((el, 2 * i // b, h // b), jnp.float32),
              gemm2_weights=((el, h, i), jnp.float8_e4m3fn), gemm2_weights_scale=((el, h // b, i // b), jnp.float32))
  assert list(testing.LayerInputs._fields) == list(want)
  for name, (shape, dtype) in want.items():
    x = getattr(inputs, name)
    assert isinstance(x, jax.Array), name
    assert x.shape == shape and x.dtype == dtype, f"{name}: {x.shape} {x.dtype}, want {shape} {dtype}"
  f32_bias = testing.random_activations(SMALL, t, seed=seed, bias_dtype=jnp.float32)[1]
  assert f32_bias.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(f32_bias.astype(jnp.bfloat16)).view(np.uint16),
                                np.asarray(inputs.routing_bias).view(np.uint16))


def test_deepseek_v3_weight_shapes_without_computing():
  shapes = jax.eval_shape(lambda: testing.random_weights(DEEPSEEK_V3, seed=0))
  assert [(s.shape, s.dtype) for s in shapes] == [
      ((32, 4096, 7168), jnp.float8_e4m3fn), ((32, 32, 56), jnp.float32),
      ((32, 7168, 2048), jnp.float8_e4m3fn), ((32, 56, 16), jnp.float32)]


def test_inputs_look_like_the_benchmark(seed):
  inputs = testing.random_layer_inputs(SMALL, 512, seed=seed)
  for name in ("hidden_states", "gemm1_weights", "gemm2_weights"):
    x = np.asarray(getattr(inputs, name)).astype(np.float64).ravel()
    assert np.abs(x).max() == 2.0, name
    # clip(N(0, 1), -2, 2) in e4m3: mean 0, std 0.96; +-2 takes |x| > 1.9375 (e4m3's spacing is 1/8 there).
    assert abs(x.mean()) < 0.01 and abs(x.std() - 0.96) < 0.01, f"{name}: mean {x.mean()}, std {x.std()}"
    at_two = 2 * (1 - statistics.NormalDist().cdf(1.9375))
    assert abs(np.mean(np.abs(x) == 2.0) - at_two) < 0.003, name
  scales = [np.asarray(x).astype(np.float64).ravel() for x in (inputs.hidden_states_scale,
            inputs.gemm1_weights_scale, inputs.gemm2_weights_scale)]
  for x in scales:
    assert (x < 0).any() and (x > 0).any() and 0.3 < x.std() < 3
  for x in (np.concatenate(scales), np.asarray(inputs.routing_logits, np.float64).ravel()):
    assert abs(x.mean()) < 0.15 and abs(x.std() - 1.0) < 0.1
  bias = np.asarray(inputs.routing_bias).astype(np.float64)
  assert 0.05 < bias.std() < 0.15 and (bias != 0).all()


def test_fp8_sampler_has_the_clipped_normal_frequencies():
  # Exact probability of each e4m3 value under clip(N(0, 1), -2, 2) then round-to-nearest, against the
  # 65536-entry inverse-CDF table behind the FP8 sampler: every frequency within one table entry.
  values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  values = np.unique(values[np.isfinite(values) & (np.abs(values) <= 2)])
  edges = np.concatenate([[-np.inf], (values[1:] + values[:-1]) / 2, [np.inf]])
  cdf = np.array([statistics.NormalDist().cdf(x) if np.isfinite(x) else float(x > 0) for x in edges])
  exact = np.diff(cdf)
  table = testing.inputs._fp8_normal_table().astype(np.float64)
  counts = np.array([(table == v).sum() for v in values]) / 65536
  assert counts.sum() == 1.0
  np.testing.assert_allclose(counts, exact, atol=1.01 / 65536)


def test_same_seed_same_inputs_and_parts_compose(seed):
  a = testing.random_layer_inputs(SMALL, 9, seed=seed, scenario="skewed", local_expert_offset=16)
  b = testing.random_layer_inputs(SMALL, 9, seed=seed, scenario="skewed", local_expert_offset=16)
  c = testing.random_layer_inputs(SMALL, 9, seed=seed + 1, scenario="skewed", local_expert_offset=16)
  parts = (*testing.random_activations(SMALL, 9, seed=seed, scenario="skewed", local_expert_offset=16),
           *testing.random_weights(SMALL, seed=seed))
  for name, x, y, z, p in zip(testing.LayerInputs._fields, a, b, c, parts):
    bits = lambda arr: np.asarray(arr).view(np.uint8)
    np.testing.assert_array_equal(bits(x), bits(y), err_msg=name)
    np.testing.assert_array_equal(bits(x), bits(p), err_msg=name)
    assert not np.array_equal(bits(x), bits(z)), f"{name}: another seed gave the same array"
  # Weights and activations come from independent streams of one seed.
  assert not np.array_equal(np.asarray(a.hidden_states)[:1, :].view(np.uint8),
                            np.asarray(a.gemm2_weights)[0, :1, :SMALL.hidden].view(np.uint8))


def test_large_seeds_work():
  inputs = testing.random_activations(SMALL, 3, seed=2**32 - 1)
  assert inputs[0].shape == (3, SMALL.num_experts)


# --- scenarios -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,offset", [(SMALL, 0), (SMALL, 8), (SMALL, 24), (SMALL, 4), (SMALL, 13),
                                           (DEEPSEEK_V3, 0), (DEEPSEEK_V3, 32), (DEEPSEEK_V3, 128),
                                           (DEEPSEEK_V3, 224)])
def test_all_local_puts_every_pick_local(config, offset, seed):
  inputs = testing.random_activations(config, 300, seed=seed, scenario="all_local", local_expert_offset=offset)
  ids, weights = _route(inputs, config)
  assert ((ids >= offset) & (ids < offset + config.num_local_experts)).all()
  rows = np.bincount(ids.ravel() - offset, minlength=config.num_local_experts)
  # Per-token variety in the logits, not the bias alone, decides among the local experts.
  assert (rows > 0).sum() >= min(config.num_local_experts, 3 * config.top_k), rows
  assert weights.std() > 0.01


@pytest.mark.parametrize("config,offset", [(SMALL, 8), (SMALL, 13), (DEEPSEEK_V3, 96)])
def test_no_local_puts_no_pick_local(config, offset, seed):
  inputs = testing.random_activations(config, 300, seed=seed, scenario="no_local", local_expert_offset=offset)
  ids, _ = _route(inputs, config)
  assert not ((ids >= offset) & (ids < offset + config.num_local_experts)).any()


def test_impossible_scenarios_raise(seed):
  too_few = SMALL.with_local_experts(2)  # top_k = 4 picks can't all land on 2 experts
  with pytest.raises(ValueError, match="all_local"):
    testing.random_activations(too_few, 4, seed=seed, scenario="all_local")
  everything = SMALL.with_local_experts(SMALL.num_experts)
  with pytest.raises(ValueError, match="no_local"):
    testing.random_activations(everything, 4, seed=seed, scenario="no_local")
  with pytest.raises(ValueError, match="local_expert_offset"):
    testing.random_activations(SMALL, 4, seed=seed, local_expert_offset=25)
  with pytest.raises(ValueError, match="scenario"):
    testing.random_activations(SMALL, 4, seed=seed, scenario="balanced")
  with pytest.raises(ValueError, match="num_tokens"):
    testing.random_activations(SMALL, -1, seed=seed)


@pytest.mark.parametrize("config,offset", [(SMALL, 0), (SMALL, 13), (DEEPSEEK_V3, 32)])
def test_skewed_concentrates_local_rows(config, offset, seed):
  t = 1000
  skewed = _local_rows_per_expert(
      testing.random_activations(config, t, seed=seed, scenario="skewed", local_expert_offset=offset), config, offset)
  uniform = _local_rows_per_expert(
      testing.random_activations(config, t, seed=seed, scenario="uniform", local_expert_offset=offset), config, offset)
  share = np.sort(skewed)[::-1][:2].sum() / skewed.sum()
  uniform_share = np.sort(uniform)[::-1][:2].sum() / uniform.sum()
  print(f"top-2 share of local rows: skewed {share:.3f}, uniform {uniform_share:.3f}")
  assert share > 0.55 and share > uniform_share + 0.1, (skewed, uniform)
  assert np.sort(skewed)[-2] > 0.5 * t, f"both hot experts should serve most tokens: {skewed}"


def test_scenarios_on_zero_tokens(seed):
  for scenario in testing.SCENARIOS:
    logits, bias, hs, hs_scale = testing.random_activations(SMALL, 0, seed=seed, scenario=scenario)
    assert logits.shape == (0, SMALL.num_experts) and hs.shape == (0, SMALL.hidden)
    assert hs_scale.shape == (SMALL.hidden // SMALL.block, 0)


# --- acceptance_metrics ----------------------------------------------------------------------------------------


def test_acceptance_passes_bf16_rounded_oracle_and_flags_wrong_outputs(seed):
  inputs = testing.random_layer_inputs(SMALL, 64, seed=seed, scenario="all_local", local_expert_offset=8)
  ref = _moe(inputs, SMALL, 8)
  good = testing.acceptance_metrics(jnp.asarray(ref, jnp.bfloat16), ref)
  assert good["passed"] and good["finite"] and good["matched_ratio"] > 0.99 and good["rel_l2"] < 5e-3, good

  rng = np.random.default_rng(seed)
  wrong = ref.copy()
  broken = rng.random(ref.shape) < 0.2
  wrong[broken] = -ref[broken] - np.sign(ref[broken]) * 2.0  # |err| > 1 and relative error > 2
  bad = testing.acceptance_metrics(wrong, ref)
  assert not bad["passed"] and bad["finite"] and abs(bad["matched_ratio"] - (1 - broken.mean())) < 1e-12, bad
  assert bad["rel_l2"] > 0.5

  # The halves of GEMM1 swapped (silu on the wrong half) must fail too.
  i = SMALL.intermediate
  swapped = inputs._replace(
      gemm1_weights=jnp.concatenate([inputs.gemm1_weights[:, i:], inputs.gemm1_weights[:, :i]], axis=1),
      gemm1_weights_scale=jnp.concatenate([inputs.gemm1_weights_scale[:, i // SMALL.block:],
                                           inputs.gemm1_weights_scale[:, :i // SMALL.block]], axis=1))
  assert not testing.acceptance_metrics(_moe(swapped, SMALL, 8), ref)["passed"]

  one_nan = np.asarray(ref, np.float32).copy()
  one_nan[3, 7] = np.nan
  nan = testing.acceptance_metrics(one_nan, ref)
  assert not nan["finite"] and not nan["passed"] and nan["matched_ratio"] < 1.0
  inf = ref.copy()
  inf[0, 0] = np.inf
  assert not testing.acceptance_metrics(inf, ref)["passed"]


def test_acceptance_criterion_edges(seed):
  rng = np.random.default_rng(seed)
  ref = rng.normal(size=(4, 10)) * 10
  ref[0, :3] = [7.5, 0.01, -3.0]
  out = ref.copy()
  out[0, :3] = [7.5 + 1.5, 0.01 + 0.9, -3.0 + 1.1]  # rel 0.2 ok; abs 0.9 ok; abs 1.1 and rel 0.37 fails
  m = testing.acceptance_metrics(out, ref)
  assert m["matched_ratio"] == pytest.approx(39 / 40) and m["passed"] and m["finite"]
  out[:, :5] += 100.0  # 20 of 40 elements fail
  m = testing.acceptance_metrics(out, ref)
  assert m["matched_ratio"] == pytest.approx(20 / 40) and not m["passed"]


def test_acceptance_rel_l2_and_zero_reference(seed):
  rng = np.random.default_rng(seed)
  ref = rng.normal(size=(3, 8))
  out = ref + 0.01 * rng.normal(size=(3, 8))
  m = testing.acceptance_metrics(out, ref)
  assert m["rel_l2"] == pytest.approx(np.linalg.norm(out - ref) / np.linalg.norm(ref))
  zero = np.zeros((3, 8))
  assert testing.acceptance_metrics(out, zero)["rel_l2"] == pytest.approx(np.linalg.norm(out))
  assert testing.acceptance_metrics(zero, zero) == dict(matched_ratio=1.0, rel_l2=0.0, finite=True, passed=True)
  empty = testing.acceptance_metrics(np.zeros((0, 8)), np.zeros((0, 8)))
  assert empty["passed"] and empty["matched_ratio"] == 1.0
  with pytest.raises(ValueError, match="shape"):
    testing.acceptance_metrics(out, ref.T)


def test_random_weights_eager_and_traced_agree():
  # Eagerly, experts are assembled in one host array (bounded memory); traced, stacked on the device.
  eager = testing.random_weights(SMALL, seed=11)
  traced = jax.jit(lambda: testing.random_weights(SMALL, seed=11))()
  for a, b in zip(eager, traced):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8) if a.dtype.itemsize == 1 else np.asarray(a),
                                  np.asarray(b).view(np.uint8) if b.dtype.itemsize == 1 else np.asarray(b))
