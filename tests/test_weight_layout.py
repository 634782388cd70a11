"""Block-major expert weights (`moe_pallas.weight_layout`): the same values in another byte order, which every
GEMM kernel reads to the same bits as the SPEC order."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_pallas as mp
from moe_pallas import testing, weight_layout
from moe_pallas.kernels import grouped_moe, mosaic_gemm, tiling


def test_block_major_round_trip_and_block_order(rng):
  w = jnp.asarray(rng.standard_normal((3, 256, 384)), jnp.float32).astype(jnp.float8_e4m3fn)
  blocked = weight_layout.to_block_major(w)
  assert blocked.shape == (3, 2, 3, 128, 128) and weight_layout.is_block_major(blocked)
  assert weight_layout.logical_shape(blocked) == weight_layout.logical_shape(w) == (3, 256, 384)
  # Block (n, k) of expert e is W[e, n*128:(n+1)*128, k*128:(k+1)*128], contiguous.
  np.testing.assert_array_equal(np.asarray(blocked[2, 1, 2], np.float32),
                                np.asarray(w[2, 128:256, 256:384], np.float32))
  np.testing.assert_array_equal(np.asarray(weight_layout.from_block_major(blocked), np.float32),
                                np.asarray(w, np.float32))


def test_dequantize_reads_block_major_values_in_spec_order(rng):
  w = jnp.asarray(rng.standard_normal((2, 256, 384)), jnp.float32)
  q = mp.quantize_blockwise(w, (128, 128))
  blocked = mp.BlockScaledArray(mp.to_block_major(q.values), q.scales, (128, 128))
  np.testing.assert_array_equal(np.asarray(mp.dequantize(blocked)), np.asarray(mp.dequantize(q)))


def test_experts_in_layout_reorders_both_weights_only():
  weights = testing.random_weights(mp.SMALL, seed=3)
  assert weight_layout.experts_in_layout(weights, "spec") == tuple(weights)
  w1, s1, w2, s2 = weight_layout.experts_in_layout(weights, "block_major")
  assert weight_layout.is_block_major(w1) and weight_layout.is_block_major(w2)
  assert s1 is weights[1] and s2 is weights[3]
  np.testing.assert_array_equal(np.asarray(weight_layout.from_block_major(w2), np.float32),
                                np.asarray(weights[2], np.float32))
  with pytest.raises(ValueError, match="layout must be 'spec' or 'block_major', got 'rows'"):
    weight_layout.experts_in_layout(weights, "rows")


def test_block_major_refuses_other_shapes():
  with pytest.raises(ValueError, match="to_block_major takes \\[E, N, K\\] weights with N and K multiples of "
                                       "128, got shape \\[2, 192, 256\\]"):
    weight_layout.to_block_major(jnp.zeros((2, 192, 256), jnp.float8_e4m3fn))
  with pytest.raises(ValueError, match="from_block_major takes .* got shape \\[2, 128, 256\\]"):
    weight_layout.from_block_major(jnp.zeros((2, 128, 256), jnp.float8_e4m3fn))


def _blocked(inputs):
  return inputs._replace(gemm1_weights=weight_layout.to_block_major(inputs.gemm1_weights),
                         gemm2_weights=weight_layout.to_block_major(inputs.gemm2_weights))


_TRITON_TILES = {
    # The H200 table's forms at small T: the stream-K GEMM1 with its in-kernel fix-up and split-K GEMM2
    # (T <= 8); two GEMM1 launches and the transposed GEMM2 (T = 14-80); and a split-K GEMM1 with 64-wide tiles.
    "stream_k": tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=64, stream_k=2, fixup_in_kernel=True),
                                 tiling.GemmTiling(block_m=16, block_n=64, block_k=64, split_k=2, swap_ab=True),
                                 bf16_rows=True),
    "busy_swap": tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=128, num_warps=8),
                                  tiling.GemmTiling(block_m=16, block_n=64, swap_ab=True),
                                  gemm1_busy=tiling.GemmTiling(block_m=16, block_n=128, num_stages=2),
                                  busy_min_tiles=3),
    "split_k": tiling.MoETiling(tiling.GemmTiling(block_m=32, block_n=64, split_k=2),
                                tiling.GemmTiling(block_m=32, block_n=128, block_k=64)),
}


@pytest.mark.parametrize("tiles", list(_TRITON_TILES), ids=list(_TRITON_TILES))
def test_triton_gemms_read_block_major_weights_to_the_same_bits(seed, tiles, interpret):
  """The whole layer on the Triton GEMMs: the same loads of the same values, so the same bits (interpret mode
  and compiled)."""
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 24, seed=seed, scenario="skewed", local_expert_offset=8)
  run = lambda x: np.asarray(grouped_moe.moe_layer_triton(*x, 8, 2.5, config=config, interpret=interpret,
                                                          tiling=_TRITON_TILES[tiles]), np.float32)
  want = run(inputs)
  assert np.abs(want).max() > 0
  np.testing.assert_array_equal(run(_blocked(inputs)).view(np.uint32), want.view(np.uint32))


def test_mosaic_gemms_read_block_major_weights_to_the_same_bits(rng, interpret):
  """Both Mosaic GEMM kernels (the grouped GEMM, its 256-column CTA tile as two 128-row blocks a K step; the
  paired SwiGLU GEMM1, up and gate a block each) on block-major weights: the same tiles in SMEM, the same
  bits."""
  num_local, intermediate, k = 3, 256, 384
  tile_expert = jnp.asarray([2, 0, 3, 2], jnp.int32)
  rows = tile_expert.shape[0] * mosaic_gemm.BLOCK_M
  fp8 = lambda shape: jnp.asarray(np.clip(rng.standard_normal(shape), -2, 2), jnp.float8_e4m3fn)
  a, w13 = fp8((rows, k)), fp8((num_local, 2 * intermediate, k))
  a_scale = jnp.asarray(rng.uniform(0.5, 2.0, (k // 128, rows)), jnp.float32)
  w13_scale = jnp.asarray(rng.standard_normal((num_local, 2 * intermediate // 128, k // 128)), jnp.float32)
  blocked = weight_layout.to_block_major(w13)
  used = np.repeat(np.asarray(tile_expert) < num_local, mosaic_gemm.BLOCK_M)

  gemm = lambda w: np.asarray(mosaic_gemm.grouped_fp8_gemm(tile_expert, a, a_scale, w, w13_scale,
                                                           interpret=interpret))[used]
  want = gemm(w13)
  assert np.abs(want).max() > 0
  np.testing.assert_array_equal(gemm(blocked), want)

  fused = lambda w: mosaic_gemm.grouped_fp8_gemm_swiglu(tile_expert, a, a_scale, w, w13_scale, warpgroups="paired",
                                                        interpret=interpret)
  (values, scales), (want_values, want_scales) = fused(blocked), fused(w13)
  np.testing.assert_array_equal(np.asarray(values.astype(jnp.float32))[used],
                                np.asarray(want_values.astype(jnp.float32))[used])
  np.testing.assert_array_equal(np.asarray(scales)[:, used], np.asarray(want_scales)[:, used])


@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_moe_layer_takes_block_major_weights(seed, implementation, interpret):
  """The public layer with either weight array block-major: the bits of the SPEC order (the kernels read the
  same values; the xla path reorders them first); apply_local_experts likewise."""
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 20, seed=seed, scenario="skewed", local_expert_offset=8)
  run = lambda x: np.asarray(mp.moe_layer(*x, local_expert_offset=8, routed_scaling_factor=2.5, config=config,
                                          implementation=implementation, interpret=interpret), np.float32)
  want = run(inputs)
  assert np.abs(want).max() > 0
  np.testing.assert_array_equal(run(_blocked(inputs)).view(np.uint32), want.view(np.uint32))
  one_blocked = inputs._replace(gemm2_weights=mp.to_block_major(inputs.gemm2_weights))
  np.testing.assert_array_equal(run(one_blocked).view(np.uint32), want.view(np.uint32))

  ids, weights = mp.route(inputs.routing_logits, inputs.routing_bias, config=config, routed_scaling_factor=2.5)
  plan = mp.plan_local(ids, weights, local_expert_offset=8, num_local_experts=config.num_local_experts)
  apply = lambda x: np.asarray(mp.apply_local_experts(*x[2:], plan, implementation=implementation,
                                                      interpret=interpret))
  np.testing.assert_array_equal(apply(_blocked(inputs)), apply(inputs))


def test_moe_layer_checks_block_major_shapes():
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 4, seed=1, scenario="uniform", local_expert_offset=8)
  call = lambda x: mp.moe_layer(*x, local_expert_offset=8, routed_scaling_factor=2.5, config=config,
                                implementation="xla")
  w1 = mp.to_block_major(inputs.gemm1_weights)
  with pytest.raises(ValueError, match="gemm1_weights must have shape \\[8, 256, 256\\] \\(\\[E_local, 2I, H\\]\\), "
                                       "got \\[8, 256, 128\\] \\(block-major, read as \\[E_local, N, K\\]\\)"):
    call(inputs._replace(gemm1_weights=w1[:, :, :1]))
  with pytest.raises(ValueError, match="gemm2_weights must have rank 3 .* or be block-major .* got shape "
                                       "\\[8, 2, 1, 128\\]"):
    call(inputs._replace(gemm2_weights=jnp.zeros((8, 2, 1, 128), jnp.float8_e4m3fn)))
