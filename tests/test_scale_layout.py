"""The activation-scale layout check, and its documented limit: shapes cannot tell the layouts apart at T = H/128.

hidden_states_scale is [H/128, T] (SPEC.md's transposed layout). A [T, H/128] array is rejected by its shape,
except when T = H/128 (T = 56 at DeepSeek-V3, a public workload), where the two shapes are equal and the
array is read as [H/128, T]. The README and `moe_layer`'s docstring say so; this file shows both sides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_pallas as mp
from moe_pallas import testing, validation
from moe_pallas.testing.oracle import oracle_moe


def _shapes(config, num_tokens, *, transposed_scale):
  """ShapeDtypeStructs of the layer's arrays (the gate reads only shapes and dtypes: no data needed)."""
  h, i, e, el, b = config.hidden, config.intermediate, config.num_experts, config.num_local_experts, 128
  scale = (num_tokens, h // b) if transposed_scale else (h // b, num_tokens)
  s = jax.ShapeDtypeStruct
  return (s((num_tokens, e), jnp.float32), s((e,), jnp.bfloat16), s((num_tokens, h), jnp.float8_e4m3fn),
          s(scale, jnp.float32), s((el, 2 * i, h), jnp.float8_e4m3fn), s((el, 2 * i // b, h // b), jnp.float32),
          s((el, h, i), jnp.float8_e4m3fn), s((el, h // b, i // b), jnp.float32))


def _gate(arrays, config):
  return validation.check_layer(*arrays, local_expert_offset=64, routed_scaling_factor=2.5, config=config,
                                implementation="xla", interpret=False, intermediate_dtype=jnp.float8_e4m3fn)


@pytest.mark.parametrize("num_tokens", [1, 55, 57, 901])
def test_wrong_layout_is_rejected_when_t_differs_from_h_over_128(num_tokens):
  config = mp.DEEPSEEK_V3
  _gate(_shapes(config, num_tokens, transposed_scale=False), config)
  with pytest.raises(ValueError, match=r"hidden_states_scale must have shape \[56, %d\]" % num_tokens):
    _gate(_shapes(config, num_tokens, transposed_scale=True), config)


def test_at_t_equal_h_over_128_the_shapes_cannot_tell():
  """T = 56 at DeepSeek-V3: both layouts have shape [56, 56]; the gate accepts both (documented limit)."""
  config = mp.DEEPSEEK_V3
  assert config.hidden // 128 == 56
  right, wrong = (_shapes(config, 56, transposed_scale=t) for t in (False, True))
  assert right[3].shape == wrong[3].shape == (56, 56)
  _gate(right, config)
  _gate(wrong, config)  # no error: nothing in the shapes says which layout the caller meant
  doc = " ".join(mp.moe_layer.__doc__.split())
  assert "when T = H/128 the two layouts have the same shape and a [T, H/128] array is taken as [H/128, T]" in doc


def test_at_t_equal_h_over_128_a_wrong_layout_gives_the_transposed_reading(seed):
  """At SMALL's T = H/128 = 2, a [T, H/128] scale computes the layer of its transpose: accepted, and wrong."""
  config, offset = mp.SMALL, 8
  num_tokens = config.hidden // 128
  inputs = testing.random_layer_inputs(config, num_tokens, seed=seed, scenario="all_local", local_expert_offset=offset)
  wrong = inputs._replace(hidden_states_scale=inputs.hidden_states_scale.T)  # [T, H/128], same shape
  run = lambda x: np.asarray(mp.moe_layer(*x, local_expert_offset=offset, routed_scaling_factor=2.5, config=config,
                                          implementation="xla"), np.float32)
  out_wrong = run(wrong)
  ref = oracle_moe(*inputs, local_expert_offset=offset, routed_scaling_factor=2.5, top_k=config.top_k,
                   n_group=config.n_group, topk_group=config.topk_group)
  ref_of_transpose = oracle_moe(*wrong, local_expert_offset=offset, routed_scaling_factor=2.5, top_k=config.top_k,
                                n_group=config.n_group, topk_group=config.topk_group)
  assert testing.acceptance_metrics(out_wrong, ref_of_transpose)["rel_l2"] < 1e-2
  assert testing.acceptance_metrics(out_wrong, ref)["rel_l2"] > 0.1  # really wrong, and no error said so
