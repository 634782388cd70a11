"""The layer is inference-only: every entry, on both implementations, raises the same InferenceOnlyError under
jax.grad / jax.vjp / jax.jvp / jax.linearize (README, "Gradients"), and nothing when no tangent reaches it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_pallas as mp
from moe_pallas import layer, testing

CONFIG = mp.SMALL
OFFSET = 8
FACTOR = 2.5
IMPLEMENTATIONS = ["xla", "triton"]


def _layer_of(inputs, implementation, wrt):
  """The layer as a function of the input named `wrt` (a float array), the rest fixed."""
  def f(x):
    args = inputs._replace(**{wrt: x})
    out = mp.moe_layer(*args, local_expert_offset=OFFSET, routed_scaling_factor=FACTOR, config=CONFIG,
                       implementation=implementation, interpret=testing.interpret_mode())
    return out.astype(jnp.float32)
  return f


def _raises_inference_only(fn):
  with pytest.raises(mp.InferenceOnlyError) as info:
    fn()
  message = str(info.value)
  assert "inference-only" in message and "moe_layer" in message
  assert isinstance(info.value, TypeError)
  return message


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_moe_layer_raises_under_every_transform(implementation, seed):
  inputs = testing.random_layer_inputs(CONFIG, 6, seed=seed, local_expert_offset=OFFSET)
  by_logits = _layer_of(inputs, implementation, "routing_logits")
  by_scale = _layer_of(inputs, implementation, "hidden_states_scale")
  by_weight_scale = _layer_of(inputs, implementation, "gemm2_weights_scale")
  messages = {
      _raises_inference_only(lambda: jax.grad(lambda x: by_logits(x).sum())(inputs.routing_logits)),
      _raises_inference_only(lambda: jax.vjp(by_scale, inputs.hidden_states_scale)),
      _raises_inference_only(lambda: jax.jvp(by_weight_scale, (inputs.gemm2_weights_scale,),
                                             (jnp.ones_like(inputs.gemm2_weights_scale),))),
      _raises_inference_only(lambda: jax.linearize(by_logits, inputs.routing_logits)),
      _raises_inference_only(lambda: jax.jit(jax.grad(lambda x: by_scale(x).sum()))(inputs.hidden_states_scale)),
  }
  assert messages == {layer.INFERENCE_ONLY_MESSAGE}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_apply_local_experts_raises(implementation, seed, interpret):
  inputs = testing.random_layer_inputs(CONFIG, 6, seed=seed, local_expert_offset=OFFSET)
  ids, weights = mp.route(inputs.routing_logits, inputs.routing_bias, config=CONFIG, routed_scaling_factor=FACTOR)

  def f(scale, weights):
    plan = mp.plan_local(ids, weights, local_expert_offset=OFFSET, num_local_experts=CONFIG.num_local_experts)
    return mp.apply_local_experts(*inputs._replace(hidden_states_scale=scale)[2:], plan,
                                  implementation=implementation, interpret=interpret).sum()

  assert np.isfinite(float(f(inputs.hidden_states_scale, weights)))
  message = _raises_inference_only(lambda: jax.grad(f)(inputs.hidden_states_scale, weights))
  assert message == _raises_inference_only(lambda: jax.grad(f, argnums=1)(inputs.hidden_states_scale, weights))


def test_all_expert_entries_raise(seed):
  config = CONFIG.with_local_experts(CONFIG.num_experts)
  inputs = testing.random_layer_inputs(config, 6, seed=seed)
  mesh = jax.make_mesh((1,), ("expert",))

  def sharded(logits):
    return mp.moe_layer_sharded(logits, *inputs[1:], mesh=mesh, routed_scaling_factor=FACTOR, config=config,
                                implementation="xla").astype(jnp.float32).sum()

  def all_experts(logits):
    return mp.moe_layer_all_experts(logits, *inputs[1:], routed_scaling_factor=FACTOR, config=config,
                                    implementation="xla").astype(jnp.float32).sum()

  for f in (sharded, all_experts):
    assert _raises_inference_only(lambda: jax.grad(f)(inputs.routing_logits)) == layer.INFERENCE_ONLY_MESSAGE


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_tangent_no_error(implementation, seed):
  """Differentiating the rest of a model is fine when no tangent reaches the layer (stop_gradient)."""
  inputs = testing.random_layer_inputs(CONFIG, 6, seed=seed, local_expert_offset=OFFSET)
  by_logits = _layer_of(inputs, implementation, "routing_logits")
  grad = jax.grad(lambda x: by_logits(jax.lax.stop_gradient(x)).sum() + (x ** 2).sum())(inputs.routing_logits)
  np.testing.assert_allclose(grad, 2 * inputs.routing_logits)
  # And the forward value under the custom_jvp wrapper is the plain call's. Every input is an argument of
  # the outer jit, so that it compiles the layer's own program: closed over, the weights would be constants
  # that XLA folds into the dots (their dequantization included), and XLA:GPU may then pick another GEMM
  # for the xla path's TF32 dots, which rounds differently. The bfloat16 output itself is compared: with a
  # float32 cast inside the jit, XLA (xla_allow_excess_precision, on by default) drops the f32 -> bf16 ->
  # f32 round trip, and on the H200 the jitted values came out unrounded (101.675 against 101.5).
  def plain(inputs):
    return mp.moe_layer(*inputs, local_expert_offset=OFFSET, routed_scaling_factor=FACTOR, config=CONFIG,
                        implementation=implementation, interpret=testing.interpret_mode())
  eager, jitted = plain(inputs), jax.jit(plain)(inputs)
  assert eager.dtype == jitted.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(eager, np.float32), np.asarray(jitted, np.float32))
