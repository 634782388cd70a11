"""BlockScaledArray and blockwise FP8 (de)quantization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_pallas import BlockScaledArray, dequantize, quantize_blockwise
from moe_pallas import quant, reference

# e4m3 keeps 3 mantissa bits: rounding a normal number moves it by at most 2^-4 of itself; below the
# smallest normal (2^-6) the spacing is the smallest subnormal 2^-9, so at most half of that.
_E4M3_REL_STEP = 2.0**-4
_E4M3_HALF_SUBNORMAL = 2.0**-10


def _fp8(rng, shape):
  """Values like the benchmark's: clip(normal, -2, 2) cast to e4m3."""
  return jnp.asarray(np.clip(rng.standard_normal(shape), -2, 2).astype(np.float32)).astype(jnp.float8_e4m3fn)


@pytest.mark.parametrize("block_shape,shape", [((1, 128), (5, 384)), ((128, 128), (256, 384)),
                                               ((128, 128), (3, 128, 256)), ((1, 128), (2, 7, 128))])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e4])
def test_round_trip_error_bound(rng, block_shape, shape, magnitude):
  x = (rng.standard_normal(shape) * magnitude).astype(np.float32)
  a = quantize_blockwise(jnp.asarray(x), block_shape)
  assert a.values.dtype == jnp.float8_e4m3fn and a.scales.dtype == jnp.float32
  bm, bk = block_shape
  assert a.scales.shape == (*shape[:-2], shape[-2] // bm, shape[-1] // bk)
  assert a.block_shape == block_shape

  tiles = np.abs(x).reshape(*shape[:-2], shape[-2] // bm, bm, shape[-1] // bk, bk)
  np.testing.assert_allclose(np.asarray(a.scales), np.maximum(tiles.max(axis=(-3, -1)), quant.AMAX_FLOOR) / 448,
                             rtol=1e-6)
  scale = np.asarray(quant.expand_scales(a.scales, block_shape))
  err = np.abs(np.asarray(dequantize(a)) - x)
  bound = _E4M3_REL_STEP * np.abs(x) + _E4M3_HALF_SUBNORMAL * scale + 1e-6 * np.abs(x)
  worst = float(np.max(err - bound))
  assert worst <= 0, f"round-trip error exceeds the e4m3 bound by {worst:.3g}"
  # The block's largest element maps to +-448 and comes back (nearly) exactly.
  rel = np.linalg.norm(np.asarray(dequantize(a)) - x) / np.linalg.norm(x)
  print(f"block_shape={block_shape} magnitude={magnitude:g}: rel_l2={rel:.3g}")
  assert rel < 0.05


def test_amax_floor_on_zero_block(rng):
  x = rng.standard_normal((4, 256)).astype(np.float32)
  x[1, 128:] = 0.0       # one all-zero (1, 128) block
  x[2, :128] = 1e-7      # one block far below the floor
  a = quantize_blockwise(jnp.asarray(x), (1, 128))
  scales = np.asarray(a.scales)
  assert scales[1, 1] == np.float32(quant.AMAX_FLOOR / 448)
  assert scales[2, 0] == np.float32(quant.AMAX_FLOOR / 448)
  assert np.all(np.isfinite(scales)) and np.all(scales > 0)
  out = np.asarray(dequantize(a))
  assert np.all(np.isfinite(out))
  assert np.all(out[1, 128:] == 0.0)
  # Below the floor the block is not scaled up to +-448 (x / scale = 0.448 here), but it still round-trips.
  np.testing.assert_allclose(out[2, :128], 1e-7, rtol=_E4M3_REL_STEP)


def test_dequantize_matches_elementwise_formula_with_negative_scales(rng):
  values = _fp8(rng, (2, 256, 384))
  scales = rng.standard_normal((2, 2, 3)).astype(np.float32)  # the benchmark draws scales from N(0, 1)
  got = np.asarray(dequantize(BlockScaledArray(values, jnp.asarray(scales), (128, 128))))
  v = np.asarray(values.astype(jnp.float32))
  e, n, k = np.meshgrid(np.arange(2), np.arange(256), np.arange(384), indexing="ij")
  np.testing.assert_array_equal(got, v * scales[e, n // 128, k // 128])


def test_dequantize_dtype(rng):
  a = quantize_blockwise(jnp.asarray(rng.standard_normal((2, 128)).astype(np.float32)))
  assert dequantize(a, jnp.bfloat16).dtype == jnp.bfloat16
  assert a.dequantize().dtype == jnp.float32


def test_block_scaled_array_is_a_pytree_through_jit(rng):
  a = quantize_blockwise(jnp.asarray(rng.standard_normal((256, 256)).astype(np.float32)), (128, 128))
  leaves, treedef = jax.tree_util.tree_flatten(a)
  assert len(leaves) == 2 and leaves[0] is a.values and leaves[1] is a.scales
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert isinstance(rebuilt, BlockScaledArray) and rebuilt.block_shape == (128, 128)

  same = jax.jit(lambda t: t)(a)
  assert isinstance(same, BlockScaledArray) and same.block_shape == (128, 128)
  np.testing.assert_array_equal(np.asarray(same.scales), np.asarray(a.scales))
  np.testing.assert_array_equal(np.asarray(same.values.astype(jnp.float32)), np.asarray(a.values.astype(jnp.float32)))

  # block_shape is static: it selects the program, it is not traced.
  np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(a)), np.asarray(dequantize(a)))
  assert jax.tree_util.tree_map(lambda leaf: leaf, a).block_shape == a.block_shape
  quantized = jax.jit(quantize_blockwise, static_argnums=1)(jnp.asarray(np.asarray(dequantize(a))), (1, 128))
  assert quantized.block_shape == (1, 128) and quantized.scales.shape == (256, 2)


def test_quantize_rejects_non_multiple_shapes(rng):
  x = jnp.asarray(rng.standard_normal((4, 200)).astype(np.float32))
  with pytest.raises(ValueError, match=r"x shape \(4, 200\) is not a multiple of block_shape \(1, 128\)"):
    quantize_blockwise(x)
  with pytest.raises(ValueError, match=r"rank >= 2"):
    quantize_blockwise(jnp.ones((128,)))


def test_activation_scale_layout_conversions(rng):
  num_tokens, hidden = 5, 384
  x = rng.standard_normal((num_tokens, hidden)).astype(np.float32)
  a = quantize_blockwise(jnp.asarray(x), (1, 128))
  public = quant.activation_scale_to_public(a.scales)
  assert public.shape == (hidden // 128, num_tokens)
  np.testing.assert_array_equal(np.asarray(public), np.asarray(a.scales).T)
  np.testing.assert_array_equal(np.asarray(quant.activation_scale_from_public(public)), np.asarray(a.scales))

  # SPEC.md step 1 with the public layout: A[t, k] = hidden_states[t, k] * scale[k // 128, t].
  got = np.asarray(reference.dequantize_activations(a.values, public))
  v = np.asarray(a.values.astype(jnp.float32))
  t, k = np.meshgrid(np.arange(num_tokens), np.arange(hidden), indexing="ij")
  np.testing.assert_array_equal(got, v * np.asarray(public)[k // 128, t])
  np.testing.assert_array_equal(got, np.asarray(dequantize(a)))
