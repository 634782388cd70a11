"""Property tests: random small geometries against the float64 oracle, on both implementations, plus edge values.

Hypothesis draws a geometry (E, E_local, top_k, n_group, topk_group, H and I in {128, 256}), T in [0, 100], any
valid offset, a routing scenario (uniform or skewed), a seed, and optionally +-inf logits sprinkled in; the
layer must pass SPEC.md's acceptance criterion and the project's rel-L2 bound against
`moe_pallas.testing.oracle` (1e-2 for the xla path's float32 SwiGLU, 3.5e-2 for the kernels' FP8 one), and
rows of tokens without a local pick must be exact zeros.

Profiles (environment variable MOE_HYPOTHESIS_PROFILE):
  "ci" (default): deterministic and bounded: derandomized draws, a fixed number of examples, no shrinking,
    no example database; the whole file runs in about a minute on a 2-core CPU (every new shape compiles).
  "thorough": many more examples, random seeds, shrinking; for a local hunt.

Edge values (fixed cases, both implementations): exact ties in the routing scores (lower index wins, as
SPEC.md and `route` prefer), FP8 values at +-448, and block scales of 1e-30 and 1e30. A result that
overflows float32 or bf16 is outside SPEC.md's criterion ("any NaN or Inf fails" assumes a finite true
result), so the extreme scales are paired (1e-30 on one operand, 1e30 on the other, or 1e+-30 on W2 only)
to keep the true result and every intermediate inside float32 and bf16 range.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import moe_pallas as mp
from moe_pallas import testing
from moe_pallas.testing.oracle import oracle_moe, oracle_route

FACTOR = 2.5
REL_L2_BOUND = {"xla": 1e-2, "triton": 3.5e-2}  # SPEC.md's project bounds (float32 / FP8 SwiGLU output)

_PROFILES = {
    "ci": dict(derandomize=True, database=None, phases=(Phase.explicit, Phase.generate), deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    "thorough": dict(derandomize=False, deadline=None, suppress_health_check=[HealthCheck.too_slow]),
}
_PROFILE = os.environ.get("MOE_HYPOTHESIS_PROFILE", "ci")
# "ci": a bounded number of draws a run (each new shape compiles: ~4 s an xla draw, ~6 s a triton one on a
# 2-core CPU); derandomized, so every CI run checks the same ones.
_EXAMPLES = {"ci": {"xla": 10, "triton": 6}, "thorough": {"xla": 300, "triton": 100}}[_PROFILE]


def _settings(implementation):
  return settings(max_examples=_EXAMPLES[implementation], **_PROFILES[_PROFILE])


@st.composite
def geometries(draw):
  """A valid MoEConfig (H, I in {128, 256}), an offset and a token count."""
  n_group = draw(st.sampled_from([1, 2, 4]))
  per_group = draw(st.sampled_from([2, 4, 8]))
  num_experts = n_group * per_group
  topk_group = draw(st.integers(1, n_group))
  top_k = draw(st.integers(1, min(8, topk_group * per_group)))
  num_local = draw(st.integers(1, num_experts))
  offset = draw(st.integers(0, num_experts - num_local))
  config = mp.MoEConfig(hidden=draw(st.sampled_from([128, 256])), intermediate=draw(st.sampled_from([128, 256])),
                        num_experts=num_experts, num_local_experts=num_local, top_k=top_k, n_group=n_group,
                        topk_group=topk_group)
  # Hypothesis favors boundaries: weight the branches so that T = 0 is one case in several, not half.
  num_tokens = draw(st.one_of(st.integers(0, 8), st.integers(1, 100), st.integers(9, 100)))
  return config, offset, num_tokens


@st.composite
def cases(draw):
  config, offset, num_tokens = draw(geometries())
  scenario = draw(st.sampled_from(["uniform", "skewed"]))
  seed = draw(st.integers(0, 2**32 - 1))
  inputs = testing.random_layer_inputs(config, num_tokens, seed=seed, scenario=scenario, local_expert_offset=offset,
                                       bias_dtype=draw(st.sampled_from([jnp.bfloat16, jnp.float32])))
  if num_tokens and draw(st.booleans()):  # +-inf logits are valid inputs: sprinkle some in
    rng = np.random.default_rng(seed)
    logits = np.asarray(inputs.routing_logits).copy()
    where = rng.random(logits.shape) < draw(st.sampled_from([0.05, 0.5, 1.0]))
    logits[where] = np.where(rng.random(int(where.sum())) < 0.5, np.inf, -np.inf)
    inputs = inputs._replace(routing_logits=jnp.asarray(logits))
    event("+-inf logits")
  event(f"scenario={scenario}")
  event("T=0" if num_tokens == 0 else "T<=8" if num_tokens <= 8 else "T>8")
  event("E_local=E" if config.num_local_experts == config.num_experts else "E_local<E")
  return config, offset, inputs


def _check(config, offset, inputs, implementation, label=""):
  out = mp.moe_layer(*inputs, local_expert_offset=offset, routed_scaling_factor=FACTOR, config=config,
                     implementation=implementation, interpret=testing.interpret_mode())
  num_tokens = inputs.routing_logits.shape[0]
  assert out.shape == (num_tokens, config.hidden) and out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  routing = dict(top_k=config.top_k, n_group=config.n_group, topk_group=config.topk_group)
  ref = oracle_moe(*inputs, local_expert_offset=offset, routed_scaling_factor=FACTOR, **routing)
  assert np.isfinite(ref).all(), "the case's true result must be finite (SPEC.md's criterion)"
  metrics = testing.acceptance_metrics(out, ref)
  context = f"{label} {implementation} {config} offset={offset} T={num_tokens}: {metrics}"
  assert metrics["passed"], context
  assert metrics["rel_l2"] <= REL_L2_BOUND[implementation], context
  ids, _ = oracle_route(inputs.routing_logits, inputs.routing_bias, routed_scaling_factor=FACTOR, **routing)
  no_local = ~((ids >= offset) & (ids < offset + config.num_local_experts)).any(axis=1)
  assert not out[no_local].any(), f"{context}: a token with no local pick must get an all-zero row"
  return out, ref


@_settings("xla")
@given(cases())
def test_xla_matches_oracle(case):
  _check(*case, "xla")


@_settings("triton")
@given(cases())
def test_triton_matches_oracle(case):
  _check(*case, "triton")


# ---- edge values, both implementations ---------------------------------------------------------------------------

IMPLEMENTATIONS = ["xla", "triton"]
CONFIG = mp.SMALL  # H=256, I=128, E=32 in 4 groups of 8 (keep 2), E_local=8, top-4
OFFSET = 8
NUM_TOKENS = 40


def _inputs(seed, scenario="uniform"):
  return testing.random_layer_inputs(CONFIG, NUM_TOKENS, seed=seed, scenario=scenario, local_expert_offset=OFFSET)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_exact_ties_go_to_the_lower_index(implementation, seed):
  """Logits on a coarse grid and a zero bias: many exactly equal scores, within groups and between group scores."""
  inputs = _inputs(seed, "skewed")
  rng = np.random.default_rng(seed)
  logits = rng.integers(-1, 2, size=(NUM_TOKENS, CONFIG.num_experts)).astype(np.float32)
  logits[0, :] = 0.0                                    # every score equal: experts 0..top_k-1 of groups 0, 1
  logits[1, :] = np.tile([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 4)  # all four group scores equal
  inputs = inputs._replace(routing_logits=jnp.asarray(logits), routing_bias=jnp.zeros((CONFIG.num_experts,),
                                                                                      jnp.bfloat16))
  ids, _ = mp.route(inputs.routing_logits, inputs.routing_bias, config=CONFIG, routed_scaling_factor=FACTOR)
  np.testing.assert_array_equal(np.asarray(ids)[0], [0, 1, 2, 3])
  np.testing.assert_array_equal(np.asarray(ids)[1], [0, 1, 8, 9])
  oracle_ids, _ = oracle_route(inputs.routing_logits, inputs.routing_bias, routed_scaling_factor=FACTOR,
                               top_k=CONFIG.top_k, n_group=CONFIG.n_group, topk_group=CONFIG.topk_group)
  np.testing.assert_array_equal(np.asarray(ids), oracle_ids)
  # Offset 0 holds experts 0..7, the tied winners of token 0: a different tie-break changes its row.
  _check(CONFIG, 0, inputs, implementation, "ties")
  _check(CONFIG, OFFSET, inputs, implementation, "ties")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fp8_values_at_plus_minus_448(implementation, seed):
  inputs = _inputs(seed, "skewed")
  rng = np.random.default_rng(seed)

  def extreme(values, fraction):
    v = np.asarray(values).copy()
    where = rng.random(v.shape) < fraction
    v[where] = np.where(rng.random(int(where.sum())) < 0.5, 448.0, -448.0).astype(v.dtype)
    return jnp.asarray(v)

  inputs = inputs._replace(hidden_states=extreme(inputs.hidden_states, 0.5),
                           gemm1_weights=extreme(inputs.gemm1_weights, 0.5),
                           gemm2_weights=extreme(inputs.gemm2_weights, 1.0))
  assert np.abs(np.asarray(inputs.gemm2_weights, np.float32)).max() == 448.0
  out, ref = _check(CONFIG, OFFSET, inputs, implementation, "+-448")
  assert np.abs(ref).max() > 1e12  # large, and still far inside float32 and bf16 range


# (activation, W13, W2) scale multipliers; each keeps the true result and the intermediates G, C finite.
EXTREME_SCALES = {
    "tiny_activations_huge_w13": (1e-30, 1e30, 1.0),
    "huge_activations_tiny_w13": (1e30, 1e-30, 1.0),
    "tiny_w2": (1.0, 1.0, 1e-30),
    "huge_w2": (1.0, 1.0, 1e30),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(EXTREME_SCALES))
def test_tiny_and_huge_scales(implementation, name, seed):
  act, w13, w2 = EXTREME_SCALES[name]
  inputs = _inputs(seed, "skewed")
  inputs = inputs._replace(hidden_states_scale=inputs.hidden_states_scale * act,
                           gemm1_weights_scale=inputs.gemm1_weights_scale * w13,
                           gemm2_weights_scale=inputs.gemm2_weights_scale * w2)
  out, ref = _check(CONFIG, OFFSET, inputs, implementation, name)
  magnitude = np.abs(ref).max() / w2  # the output's magnitude follows W2's multiplier only
  assert 1e-4 < magnitude < 1e6, magnitude
