"""The Mosaic GPU grouped GEMM (kernels/mosaic_gemm.py) and the layer built on it (`MoETiling.gemm_kernels`).

On CPU the kernel runs in Mosaic GPU's interpret mode, on the H200 compiled (the `interpret` fixture); both
against float64 references. Bounds: interpret mode multiplies FP8 values exactly in float32 (rel-L2 ~1e-7;
1e-5 used); on the GPU the FP8 wgmma accumulates each 128-long K step in reduced precision (~2^-14 per
addition, rel-L2 ~1e-4 measured by experiments/mosaic_fp8_probe.py; 1e-3 used).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_pallas as mp
from moe_pallas import testing
from moe_pallas.kernels import grouped_gemm, grouped_moe, tiling
from moe_pallas.kernels import mosaic_gemm
from moe_pallas.kernels.schedule import make_tile_schedule
from moe_pallas.testing import oracle_moe

FP8_BOUND = 3.5e-2  # SPEC.md: SwiGLU output re-quantized to FP8 before GEMM2
MOSAIC_TILES = tiling.MoETiling(tiling.GemmTiling(block_m=64, block_n=128), tiling.GemmTiling(block_m=64, block_n=128),
                                gemm_kernels="mosaic")
TRITON_TILES = tiling.MoETiling(tiling.GemmTiling(block_m=64, block_n=128), tiling.GemmTiling(block_m=64, block_n=128))


def _fp8(rng, shape):
  return jnp.asarray(np.clip(rng.standard_normal(shape), -2, 2), jnp.float8_e4m3fn)


def _reference(tile_expert, a, a_scale, w, w_scale) -> np.ndarray:
  """float64: each used M-tile's block-scaled product with its expert's weights; NaN rows for unused tiles."""
  a64, w64 = np.asarray(a, np.float64), np.asarray(w, np.float64)
  sa, sw = np.asarray(a_scale, np.float64), np.asarray(w_scale, np.float64)
  num_local, n, k = w64.shape
  out = np.full((a64.shape[0], n), np.nan)
  for tile, expert in enumerate(np.asarray(tile_expert)):
    if expert >= num_local:
      continue
    rows = slice(tile * mosaic_gemm.BLOCK_M, (tile + 1) * mosaic_gemm.BLOCK_M)
    acc = np.zeros((mosaic_gemm.BLOCK_M, n))
    for kb in range(k // 128):
      ks = slice(kb * 128, (kb + 1) * 128)
      acc += (a64[rows, ks] @ w64[expert, :, ks].T) * sa[kb, rows][:, None] * np.repeat(sw[expert, :, kb], 128)
    out[rows] = acc
  return out


@pytest.mark.parametrize("n,k,tile_expert", [
    (256, 256, [2, 0, 2, 3]),        # experts out of order, one repeated, one tile of no expert (3 = E)
    (512, 384, [1, 3, 3]),           # two CTA columns, three K steps, trailing unused tiles
    (256, 128, [0]),                 # one K step
])
def test_grouped_gemm_matches_float64(rng, n, k, tile_expert, interpret):
  num_local, tile_expert = 3, jnp.asarray(tile_expert, jnp.int32)
  rows = tile_expert.shape[0] * mosaic_gemm.BLOCK_M
  a, w = _fp8(rng, (rows, k)), _fp8(rng, (num_local, n, k))
  a_scale = jnp.asarray(rng.uniform(0.5, 2.0, (k // 128, rows)), jnp.float32)
  w_scale = jnp.asarray(rng.standard_normal((num_local, n // 128, k // 128)), jnp.float32)  # signed, as SPEC allows
  got = np.asarray(jax.jit(lambda *x: mosaic_gemm.grouped_fp8_gemm(*x, interpret=interpret))(
      tile_expert, a, a_scale, w, w_scale), np.float64)
  want = _reference(tile_expert, a.astype(jnp.float32), a_scale, w.astype(jnp.float32), w_scale)
  used = ~np.isnan(want[:, 0])
  err = np.linalg.norm(got[used] - want[used]) / np.linalg.norm(want[used])
  print(f"n={n} k={k} tiles={list(np.asarray(tile_expert))}: rel-L2 {err:.2e}")
  assert err < (1e-5 if interpret else 1e-3)


def test_unused_experts_are_never_read(rng, interpret):
  """NaN weights and scales in every expert no tile uses leave the used tiles' products finite."""
  num_local, n, k = 4, 256, 256
  tile_expert = jnp.asarray([1, 1, 4], jnp.int32)
  rows = 3 * mosaic_gemm.BLOCK_M
  a = _fp8(rng, (rows, k))
  a_scale = jnp.ones((k // 128, rows), jnp.float32)
  unused = (jnp.arange(num_local) != 1)[:, None, None]
  w = jnp.where(unused, jnp.asarray(jnp.nan, jnp.float8_e4m3fn), _fp8(rng, (num_local, n, k)))
  w_scale = jnp.where(unused, jnp.nan, jnp.ones((num_local, n // 128, k // 128), jnp.float32))
  got = np.asarray(mosaic_gemm.grouped_fp8_gemm(tile_expert, a, a_scale, w, w_scale, interpret=interpret))
  assert np.isfinite(got[:2 * mosaic_gemm.BLOCK_M]).all()


@pytest.mark.parametrize("kernel", ["gemm", "gemm_swiglu"])
def test_only_the_used_tiles_are_computed(rng, kernel, interpret):
  """`used_tiles`: the persistent CTAs visit the leading tiles only (the schedule puts the used ones first);
  a tile past the count is left unwritten even though it names an expert."""
  num_local, n, k = 3, 512, 256
  tile_expert = jnp.asarray([0, 2, 1, 1, 0], jnp.int32)
  rows = tile_expert.shape[0] * mosaic_gemm.BLOCK_M
  a, w = _fp8(rng, (rows, k)), _fp8(rng, (num_local, n, k))
  a_scale = jnp.asarray(rng.uniform(0.5, 2.0, (k // 128, rows)), jnp.float32)
  w_scale = jnp.asarray(rng.uniform(0.5, 2.0, (num_local, n // 128, k // 128)), jnp.float32)
  if kernel == "gemm":
    run = lambda used: mosaic_gemm.grouped_fp8_gemm(tile_expert, a, a_scale, w, w_scale, used_tiles=used,
                                                    interpret=interpret)
  else:
    run = lambda used: mosaic_gemm.grouped_fp8_gemm_swiglu(tile_expert, a, a_scale, w, w_scale, used_tiles=used,
                                                           interpret=interpret)[0]
  # Both outputs stay alive until compared, so the second cannot land in the first's memory (stale rows).
  every_out, leading_out = run(None), run(jnp.int32(3))
  every, leading = np.asarray(every_out, np.float32), np.asarray(leading_out, np.float32)
  computed = 3 * mosaic_gemm.BLOCK_M
  np.testing.assert_array_equal(leading[:computed], every[:computed])
  assert np.isfinite(every).all() and np.abs(every[computed:]).max() > 0
  assert not np.array_equal(leading[computed:], every[computed:])  # tiles 3 and 4 were not computed


def test_rejects_a_used_tiles_that_is_not_one_integer():
  a, scale = jnp.zeros((64, 256), jnp.float8_e4m3fn), jnp.ones((2, 64))
  w, w_scale = jnp.zeros((1, 256, 256), jnp.float8_e4m3fn), jnp.ones((1, 2, 2))
  for bad in (jnp.ones((2,), jnp.int32), jnp.float32(1.0)):
    with pytest.raises(ValueError, match="used_tiles must be one integer"):
      mosaic_gemm.grouped_fp8_gemm(jnp.zeros((1,), jnp.int32), a, scale, w, w_scale, used_tiles=bad)


def test_rejects_shapes_it_does_not_cover():
  a = jnp.zeros((64, 256), jnp.float8_e4m3fn)
  scales = lambda n: (jnp.ones((2, 64)), jnp.ones((1, n // 128, 2)))
  with pytest.raises(ValueError, match="N must be a multiple of 256"):
    mosaic_gemm.grouped_fp8_gemm(jnp.zeros((1,), jnp.int32), a, scales(128)[0], jnp.zeros((1, 128, 256), a.dtype),
                                 scales(128)[1])
  with pytest.raises(ValueError, match="expected num_tiles"):
    mosaic_gemm.grouped_fp8_gemm(jnp.zeros((2,), jnp.int32), a, scales(256)[0], jnp.zeros((1, 256, 256), a.dtype),
                                 scales(256)[1])
  with pytest.raises(ValueError, match="gemm_kernels='mosaic' needs block_m=64"):
    tiling.MoETiling(tiling.GemmTiling(block_m=16), tiling.GemmTiling(block_m=16), gemm_kernels="mosaic")
  with pytest.raises(ValueError, match="no swap_ab.*swap_ab\\) = \\(64, 128, 1, 1, 1, 1, True\\)"):
    tiling.MoETiling(tiling.GemmTiling(block_m=64), tiling.GemmTiling(block_m=64, swap_ab=True), gemm_kernels="mosaic")
  with pytest.raises(ValueError, match="gemm_kernels must be one of"):
    tiling.MoETiling(gemm_kernels="cutlass")
  w13_scale = jnp.ones((1, 2, 2))
  with pytest.raises(ValueError, match="warpgroups must be one of \\('on_up', 'split', 'paired'\\), got 'both'"):
    mosaic_gemm.grouped_fp8_gemm_swiglu(jnp.zeros((1,), jnp.int32), a, scales(256)[0],
                                        jnp.zeros((1, 256, 256), a.dtype), w13_scale, warpgroups="both")


@pytest.mark.parametrize("options", [dict(), dict(warpgroups="split"), dict(warpgroups="paired")],
                         ids=["on_up", "split", "paired"])
def test_fused_swiglu_epilogue_equals_the_separate_kernels(rng, options, interpret):
  """GEMM1 with SwiGLU + quant in its epilogue (on the up warpgroup, split by columns over both, or each
  warpgroup with up and gate of its 64 columns) against GEMM1 to float32 then `swiglu_of_partials`: the same
  products and promotion, so in interpret mode the same bits; compiled, the two SwiGLUs' exp may differ in
  the last bit, which can flip an FP8 rounding (and the paired kernel's 64-wide wgmmas may accumulate in
  another order)."""
  num_local, intermediate, k = 3, 256, 384
  tile_expert = jnp.asarray([2, 0, 3, 2], jnp.int32)
  rows = tile_expert.shape[0] * mosaic_gemm.BLOCK_M
  a, w13 = _fp8(rng, (rows, k)), _fp8(rng, (num_local, 2 * intermediate, k))
  a_scale = jnp.asarray(rng.uniform(0.5, 2.0, (k // 128, rows)), jnp.float32)
  w13_scale = jnp.asarray(rng.standard_normal((num_local, 2 * intermediate // 128, k // 128)), jnp.float32)
  fused, fused_scale = mosaic_gemm.grouped_fp8_gemm_swiglu(tile_expert, a, a_scale, w13, w13_scale, **options,
                                                           interpret=interpret)
  gate_up = mosaic_gemm.grouped_fp8_gemm(tile_expert, a, a_scale, w13, w13_scale, interpret=interpret)
  split, split_scale = grouped_gemm.swiglu_of_partials(tile_expert, gate_up, num_local_experts=num_local,
                                                       tiling=TRITON_TILES.gemm1, interpret=interpret)
  used = np.repeat(np.asarray(tile_expert) < num_local, mosaic_gemm.BLOCK_M)
  values = lambda v, s: (np.asarray(v.astype(jnp.float32))[used].reshape(used.sum(), -1, 128)
                         * np.asarray(s)[:, used].T[:, :, None])
  got, want = values(fused, fused_scale), values(split, split_scale)
  assert np.isfinite(want).all() and np.abs(want).max() > 0
  if interpret:
    np.testing.assert_array_equal(got, want)
  else:
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


# chain_items is an option no table sets (PERF 37: no gain), so two of its layouts run on the CPU, not four
# (~12 s each in interpret mode): chains of several items, and CTAs of one item or none.
@pytest.mark.parametrize("n,k,used", [
    (512, 512, 4),   # 8 items for 3 CTAs (interpret mode): chains of 3, 3 and 2 items, 4 K steps each
    (256, 256, 2),   # 2 items: two CTAs of one item each (a pipeline alone), one CTA of none
])
def test_chained_items_give_the_same_bits(rng, n, k, used, interpret):
  """`chain_items`: each CTA's items as one chained pipeline (START, STEADY..., STOP) give the unchained
  kernels' bits, for both kernels; the tiles past `used_tiles` are left unwritten as before."""
  num_local = 3
  tile_expert = jnp.asarray([0, 2, 1, 1, 0, 2, 3][:max(used + 1, 2)], jnp.int32)
  rows = tile_expert.shape[0] * mosaic_gemm.BLOCK_M
  a, w = _fp8(rng, (rows, k)), _fp8(rng, (num_local, n, k))
  a_scale = jnp.asarray(rng.uniform(0.5, 2.0, (k // 128, rows)), jnp.float32)
  w_scale = jnp.asarray(rng.standard_normal((num_local, n // 128, k // 128)), jnp.float32)
  args = (tile_expert, a, a_scale, w, w_scale)
  computed = used * mosaic_gemm.BLOCK_M
  assert mosaic_gemm.chains_items(k // 128)
  assert not mosaic_gemm.chains_items(5)  # 5 K steps, 4 concurrent: the items would run unchained
  # The same wgmmas and promotions in the same order, only the loads issued earlier: the same bits, interpreted
  # or compiled.
  used_tiles = jnp.int32(used)
  as_f32 = lambda x: np.asarray(x.astype(jnp.float32))
  gemm = lambda chain: as_f32(mosaic_gemm.grouped_fp8_gemm(*args, used_tiles=used_tiles, chain_items=chain,
                                                           interpret=interpret))[:computed]
  want = gemm(False)
  assert np.abs(want).max() > 0
  np.testing.assert_array_equal(gemm(True), want)
  swiglu = lambda chain: mosaic_gemm.grouped_fp8_gemm_swiglu(*args, used_tiles=used_tiles, warpgroups="split",
                                                             chain_items=chain, interpret=interpret)
  (values, scales), (chained_values, chained_scales) = swiglu(False), swiglu(True)
  np.testing.assert_array_equal(as_f32(chained_values)[:computed], as_f32(values)[:computed])
  np.testing.assert_array_equal(np.asarray(chained_scales)[:, :computed], np.asarray(scales)[:, :computed])
  with pytest.raises(ValueError, match="chain_items needs used_tiles"):
    mosaic_gemm.grouped_fp8_gemm(*args, chain_items=True, interpret=interpret)


def test_group_m_orders_the_items_only(rng, interpret):
  """`group_m` (M-tiles per column sweep) changes which CTA takes which item and when, not an item's sums:
  the same bits for groups of 1 (each M-tile sweeps the columns) and the default 8 (the 5 used tiles sweep
  them together) over 2 column blocks, both kernels."""
  num_local, n, k = 3, 512, 128
  tile_expert = jnp.asarray([0, 2, 1, 1, 0, 3], jnp.int32)
  rows = tile_expert.shape[0] * mosaic_gemm.BLOCK_M
  a, w = _fp8(rng, (rows, k)), _fp8(rng, (num_local, n, k))
  a_scale = jnp.asarray(rng.uniform(0.5, 2.0, (k // 128, rows)), jnp.float32)
  w_scale = jnp.asarray(rng.standard_normal((num_local, n // 128, k // 128)), jnp.float32)
  args, used_tiles, computed = (tile_expert, a, a_scale, w, w_scale), jnp.int32(5), 5 * mosaic_gemm.BLOCK_M
  as_f32 = lambda x: np.asarray(x.astype(jnp.float32))[:computed]
  gemm = lambda g: as_f32(mosaic_gemm.grouped_fp8_gemm(*args, used_tiles=used_tiles, group_m=g, interpret=interpret))
  swiglu = lambda g: mosaic_gemm.grouped_fp8_gemm_swiglu(*args, used_tiles=used_tiles, warpgroups="paired",
                                                         group_m=g, interpret=interpret)[0]
  want, want_swiglu = gemm(mosaic_gemm.DEFAULT_GROUP_M), as_f32(swiglu(mosaic_gemm.DEFAULT_GROUP_M))
  assert np.abs(want).max() > 0 and np.abs(want_swiglu).max() > 0
  np.testing.assert_array_equal(gemm(1), want)
  np.testing.assert_array_equal(as_f32(swiglu(1)), want_swiglu)
  for kernel in (mosaic_gemm.grouped_fp8_gemm, mosaic_gemm.grouped_fp8_gemm_swiglu):
    with pytest.raises(ValueError, match="group_m must be an int >= 1, got 0"):
      kernel(*args, group_m=0, interpret=interpret)


def test_layer_passes_each_gemms_group_m(monkeypatch):
  """The Mosaic path hands each GEMM its tiling's group_m (the H200 table: 32 above 512 rows per expert)."""
  seen = []
  real = (mosaic_gemm.grouped_fp8_gemm, mosaic_gemm.grouped_fp8_gemm_swiglu)
  monkeypatch.setattr(mosaic_gemm, "grouped_fp8_gemm",
                      lambda *a, **kw: (seen.append((kw.get("name"), kw["group_m"])), real[0](*a, **kw))[1])
  monkeypatch.setattr(mosaic_gemm, "grouped_fp8_gemm_swiglu",
                      lambda *a, **kw: (seen.append(("swiglu", kw["group_m"])), real[1](*a, **kw))[1])
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 8, seed=3, local_expert_offset=8)
  for kernels in ("mosaic", "mosaic_fused_swiglu_paired"):
    tiles = dataclasses.replace(MOSAIC_TILES, gemm_kernels=kernels,
                                gemm1=dataclasses.replace(MOSAIC_TILES.gemm1, group_m=5),
                                gemm2=dataclasses.replace(MOSAIC_TILES.gemm2, group_m=7))
    jax.eval_shape(lambda *x: grouped_moe.moe_layer_triton(*x, 8, 2.5, config=config, tiling=tiles), *inputs)
  assert seen == [("moe_gemm1_mosaic", 5), ("moe_gemm2_mosaic", 7), ("swiglu", 5), ("moe_gemm2_mosaic", 7)]
  h200 = tiling.default_tiling(14107, 8, 32, device_kind="NVIDIA H200")
  assert h200.mosaic and h200.gemm1.group_m == h200.gemm2.group_m == 32
  assert tiling.default_tiling(901, 8, 32, device_kind="NVIDIA H200").gemm1.group_m == mosaic_gemm.DEFAULT_GROUP_M


def test_gather_rows_copies_the_rows_of_used_tiles(rng, interpret):
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 40, seed=int(rng.integers(2**31)), local_expert_offset=8)
  ids, weights = mp.route(inputs.routing_logits, inputs.routing_bias, config=config, routed_scaling_factor=2.5)
  plan = mp.plan_local(ids, weights, local_expert_offset=8, num_local_experts=config.num_local_experts)
  sched = make_tile_schedule(plan, block_m=mosaic_gemm.BLOCK_M)
  rows, rows_scale = grouped_gemm.gather_rows(sched.tile_expert, sched.row_token, inputs.hidden_states,
                                              inputs.hidden_states_scale, block_m=mosaic_gemm.BLOCK_M,
                                              num_local_experts=config.num_local_experts, interpret=interpret)
  used = np.repeat(np.asarray(sched.tile_expert) < config.num_local_experts, mosaic_gemm.BLOCK_M)
  assert used.any()
  tokens = np.asarray(sched.row_token)[used]
  np.testing.assert_array_equal(np.asarray(rows.astype(jnp.float32))[used],
                                np.asarray(inputs.hidden_states.astype(jnp.float32))[tokens])
  np.testing.assert_array_equal(np.asarray(rows_scale)[:, used], np.asarray(inputs.hidden_states_scale)[:, tokens])


@pytest.mark.parametrize("num_tiles,hidden,scale_shapes", [
    (40, 256, [(8, 4, 2), (8, 2, 4)]),     # SMALL's W13 and W2 scales: 40 tiles, 2 column blocks
    (3, 128, [(8, 4, 2), (8, 56, 16)]),    # fewer tiles than experts, one column block: the grid grows
    (5, 1024, [(4, 32, 56)]),              # DeepSeek-V3's W13 scales (four experts), C = N/128 = 32
])
def test_gather_rows_lays_out_weight_scales(rng, num_tiles, hidden, scale_shapes, interpret):
  """`transposed_scales`: the row gather's programs lay out each weight scale as `weight_scale_rows` does
  (transposed, zero-padded to 32 columns), bit for bit, and still gather the rows."""
  block_m, num_local = mosaic_gemm.BLOCK_M, 8
  tile_expert = jnp.asarray(rng.integers(0, num_local + 1, num_tiles), jnp.int32)  # some tiles of no expert
  row_token = jnp.asarray(rng.integers(0, 20, num_tiles * block_m), jnp.int32)
  a, a_scale = _fp8(rng, (20, hidden)), jnp.asarray(rng.standard_normal((hidden // 128, 20)), jnp.float32)
  scales = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in scale_shapes]
  rows, rows_scale, *laid_out = grouped_gemm.gather_rows(
      tile_expert, row_token, a, a_scale, block_m=block_m, num_local_experts=num_local, interpret=interpret,
      transposed_scales=[(w, mosaic_gemm.weight_scale_cols(w.shape)) for w in scales])
  for got, w in zip(laid_out, scales):
    np.testing.assert_array_equal(got, mosaic_gemm.weight_scale_rows(w))
  used = np.repeat(np.asarray(tile_expert) < num_local, block_m)
  tokens = np.asarray(row_token)[used]
  np.testing.assert_array_equal(np.asarray(rows.astype(jnp.float32))[used], np.asarray(a.astype(jnp.float32))[tokens])
  np.testing.assert_array_equal(np.asarray(rows_scale)[:, used], np.asarray(a_scale)[:, tokens])


def test_weight_scale_layout_is_checked():
  w_scale = jnp.ones((4, 2, 2), jnp.float32)
  with pytest.raises(ValueError, match=r"w_scale_rows must be weight_scale_rows\(w_scale\): float32\[4, 2, 32\]"):
    mosaic_gemm.grouped_fp8_gemm(jnp.zeros((1,), jnp.int32), jnp.zeros((64, 256), jnp.float8_e4m3fn),
                                 jnp.ones((2, 64), jnp.float32), jnp.zeros((4, 256, 256), jnp.float8_e4m3fn),
                                 w_scale, w_scale_rows=jnp.ones((4, 2, 2), jnp.float32), interpret=True)
  with pytest.raises(ValueError, match=r"transposed_scales takes \(\[E, N', K'\] float32, C >= N'\) pairs"):
    grouped_gemm.gather_rows(jnp.zeros((1,), jnp.int32), jnp.zeros((64,), jnp.int32),
                             jnp.zeros((4, 128), jnp.float8_e4m3fn), jnp.ones((1, 4), jnp.float32), block_m=64,
                             num_local_experts=4, transposed_scales=[(w_scale, 1)], interpret=True)
  for flag in ("scales_in_gather", "weights_in_gemm2", "chain_items"):
    with pytest.raises(ValueError, match=f"{flag} needs the Mosaic GEMMs"):
      tiling.MoETiling(**{flag: True})
  assert not dataclasses.replace(MOSAIC_TILES, chain_items=True).with_triton_gemms().chain_items


# The two XLA-kernel flags together, not each alone (~27 s a case in interpret mode): they change different
# kernels (the row gather's programs; GEMM2's scales), so a flag that changed a bit changes the pair's.
@pytest.mark.parametrize("flags", [dict(scales_in_gather=True, weights_in_gemm2=True), dict(chain_items=True)],
                         ids=["scales_in_gather+weights_in_gemm2", "chain_items"])
def test_layer_options_of_the_mosaic_path_give_the_same_bits(seed, flags, interpret):
  """`scales_in_gather` (the weight scales laid out by the row gather's programs) and `weights_in_gemm2` (the
  routing weights multiplied into GEMM2's activation scales in the kernel), in place of XLA kernels, and
  `chain_items` (both Mosaic GEMMs' items chained per CTA): the same output, bit for bit."""
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 50, seed=seed, scenario="skewed", local_expert_offset=8)
  tiles = dataclasses.replace(MOSAIC_TILES, gemm_kernels="mosaic_fused_swiglu_split")
  run = lambda tiles: np.asarray(grouped_moe.moe_layer_triton(*inputs, 8, 2.5, config=config, interpret=interpret,
                                                              tiling=tiles), np.float32)
  base = run(tiles)
  assert np.abs(base).max() > 0
  np.testing.assert_array_equal(run(dataclasses.replace(tiles, **flags)), base)


def test_row_factor_equals_scaled_activation_scales(rng, interpret):
  """`grouped_fp8_gemm(row_factor=f)` gives the bits of `a_scale * f` passed as the activation scales."""
  tile_expert = jnp.asarray([1, 0, 2], jnp.int32)
  rows = 3 * mosaic_gemm.BLOCK_M
  a, w = _fp8(rng, (rows, 256)), _fp8(rng, (3, 256, 256))
  a_scale = jnp.asarray(rng.standard_normal((2, rows)), jnp.float32)
  w_scale = jnp.asarray(rng.standard_normal((3, 2, 2)), jnp.float32)
  factor = jnp.asarray(rng.uniform(0.1, 2.5, rows), jnp.float32)
  got = mosaic_gemm.grouped_fp8_gemm(tile_expert, a, a_scale, w, w_scale, row_factor=factor, interpret=interpret)
  want = mosaic_gemm.grouped_fp8_gemm(tile_expert, a, a_scale * factor[None, :], w, w_scale, interpret=interpret)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match=r"row_factor must be \[rows\] = \[192\] float32"):
    mosaic_gemm.grouped_fp8_gemm(tile_expert, a, a_scale, w, w_scale, row_factor=factor[:10], interpret=interpret)


def test_bf16_out_is_the_float32_out_rounded_once(rng, interpret):
  """`grouped_fp8_gemm(out_dtype=bfloat16)`: the float32 result rounded to bfloat16 as it is stored."""
  tile_expert = jnp.asarray([1, 0, 3], jnp.int32)  # the last tile belongs to no expert: left unwritten
  rows = 3 * mosaic_gemm.BLOCK_M
  a, w = _fp8(rng, (rows, 256)), _fp8(rng, (3, 256, 256))
  a_scale = jnp.asarray(rng.standard_normal((2, rows)), jnp.float32)
  w_scale = jnp.asarray(rng.standard_normal((3, 2, 2)), jnp.float32)
  gemm = functools.partial(mosaic_gemm.grouped_fp8_gemm, tile_expert, a, a_scale, w, w_scale, interpret=interpret)
  want = np.asarray(gemm())[:2 * mosaic_gemm.BLOCK_M]
  got = gemm(out_dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16 and np.abs(want).max() > 0
  np.testing.assert_array_equal(np.asarray(got)[:2 * mosaic_gemm.BLOCK_M], want.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="out_dtype must be float32 or bfloat16, got float16"):
    gemm(out_dtype=jnp.float16)


@pytest.mark.parametrize("gemm_kernels", ["mosaic", "mosaic_fused_swiglu_split"])
def test_layer_with_bf16_rows_matches_oracle(seed, gemm_kernels, interpret):
  """GEMM2's rows as bfloat16 into the combine (`MoETiling.bf16_rows`): within SPEC.md's bound, and within
  bfloat16 rounding of the float32-row output (which the oracle bounds through it)."""
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 120, seed=seed, scenario="skewed", local_expert_offset=8)
  tiles = dataclasses.replace(MOSAIC_TILES, gemm_kernels=gemm_kernels, bf16_rows=True)
  run = lambda tiles: np.asarray(grouped_moe.moe_layer_triton(*inputs, 8, 2.5, config=config, interpret=interpret,
                                                              tiling=tiles, out_dtype=jnp.float32))
  out = run(tiles)
  ref = oracle_moe(*inputs, local_expert_offset=8, routed_scaling_factor=2.5, top_k=config.top_k,
                   n_group=config.n_group, topk_group=config.topk_group)
  metrics = testing.acceptance_metrics(out, ref)
  print(f"{gemm_kernels} bf16 rows: matched {metrics['matched_ratio']:.4f}, rel_l2 {metrics['rel_l2']:.2e}")
  assert metrics["passed"] and metrics["rel_l2"] < FP8_BOUND, metrics
  f32_rows = run(dataclasses.replace(tiles, bf16_rows=False))
  # Each of a token's <= top_k rows rounded once (<= 2^-9 relative), then summed in float32: the rows'
  # rounding errors are independent, so the sum's is ~2^-9 of the rows' norm in L2 (elementwise, a sum
  # that cancels can be off by more than 2^-9 of itself).
  change = np.linalg.norm(out - f32_rows) / np.linalg.norm(f32_rows)
  print(f"  against float32 rows: rel_l2 {change:.2e}")
  assert 0 < change < 2.0**-8, change


@pytest.mark.parametrize("num_tokens,scenario,offset", [(3, "uniform", 8), (50, "skewed", 8), (300, "all_local", 16),
                                                        (64, "no_local", 8)])
def test_layer_with_mosaic_gemms_matches_oracle(seed, num_tokens, scenario, offset, interpret):
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, num_tokens, seed=seed, scenario=scenario, local_expert_offset=offset)
  out = jax.jit(lambda *x: grouped_moe.moe_layer_triton(*x, config=config, interpret=interpret, tiling=MOSAIC_TILES))(
      *inputs, offset, 2.5)
  ref = oracle_moe(*inputs, local_expert_offset=offset, routed_scaling_factor=2.5, top_k=config.top_k,
                   n_group=config.n_group, topk_group=config.topk_group)
  assert out.shape == (num_tokens, config.hidden) and out.dtype == jnp.bfloat16
  metrics = testing.acceptance_metrics(out, ref)
  print(f"T={num_tokens} {scenario}: matched {metrics['matched_ratio']:.4f}, rel_l2 {metrics['rel_l2']:.2e}")
  no_local = ~np.asarray(ref).any(axis=1)
  assert (np.asarray(out, np.float32)[no_local] == 0).all()  # tokens with no local expert: exact zeros
  if no_local.all():
    return
  assert metrics["passed"], metrics
  assert metrics["rel_l2"] < FP8_BOUND, metrics


# The H200 table's form ("_paired") on both draws, the other two on one each: the kernel-level test above
# holds all three to the separate kernels' bits.
@pytest.mark.parametrize("gemm_kernels,num_tokens,scenario", [
    ("mosaic_fused_swiglu_paired", 50, "skewed"), ("mosaic_fused_swiglu_paired", 300, "all_local"),
    ("mosaic_fused_swiglu", 300, "all_local"), ("mosaic_fused_swiglu_split", 50, "skewed")])
def test_layer_with_the_fused_swiglu_epilogue_matches_oracle(seed, num_tokens, scenario, gemm_kernels, interpret):
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, num_tokens, seed=seed, scenario=scenario, local_expert_offset=8)
  tiles = dataclasses.replace(MOSAIC_TILES, gemm_kernels=gemm_kernels)
  out = grouped_moe.moe_layer_triton(*inputs, 8, 2.5, config=config, interpret=interpret, tiling=tiles)
  ref = oracle_moe(*inputs, local_expert_offset=8, routed_scaling_factor=2.5, top_k=config.top_k,
                   n_group=config.n_group, topk_group=config.topk_group)
  metrics = testing.acceptance_metrics(out, ref)
  print(f"T={num_tokens} {scenario}: matched {metrics['matched_ratio']:.4f}, rel_l2 {metrics['rel_l2']:.2e}")
  assert metrics["passed"] and metrics["rel_l2"] < FP8_BOUND, metrics


def test_mosaic_and_triton_gemms_agree(seed, interpret):
  """Same schedule, same FP8 quant of the SwiGLU output: the two backends differ only in float32 summation
  order (and, compiled, the wgmma's reduced-precision accumulation within a K step)."""
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 120, seed=seed, scenario="skewed", local_expert_offset=8)
  run = lambda tiles: np.asarray(grouped_moe.moe_layer_triton(*inputs, 8, 2.5, config=config, interpret=interpret,
                                                              tiling=tiles, out_dtype=jnp.float32))
  triton = run(TRITON_TILES)
  mosaic = run(MOSAIC_TILES)
  # A row whose SwiGLU output lands near an FP8 rounding boundary can round the other way: compare in L2.
  assert np.linalg.norm(mosaic - triton) / np.linalg.norm(triton) < 1e-2


def test_default_tiling_picks_mosaic_where_it_runs():
  h200 = lambda t, **kw: tiling.default_tiling(t, 8, 32, device_kind="NVIDIA H200", hidden=7168, **kw)
  assert h200(14107).mosaic and h200(4096).mosaic and h200(901).mosaic
  assert not h200(80).mosaic and not h200(1).mosaic and not h200(512).mosaic
  assert not tiling.default_tiling(14107, 8, 32, device_kind="NVIDIA H100 80GB HBM3").mosaic


def _table_picking_mosaic(*args, **kwargs):
  """A tiling table that picks the Mosaic GEMMs (as the H200's does at large T)."""
  return MOSAIC_TILES


def test_bf16_intermediate_uses_the_triton_gemms(seed, monkeypatch, interpret):
  """The Mosaic GEMM2 takes FP8 rows only: with a bf16 intermediate the default falls back to the table's
  Triton GEMMs, and an explicit Mosaic tiling is refused with the reason."""
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 8, seed=seed, local_expert_offset=8)
  run = lambda **kw: np.asarray(grouped_moe.moe_layer_triton(*inputs, 8, 2.5, config=config, interpret=interpret,
                                                             intermediate_dtype=jnp.bfloat16, **kw), np.float32)
  monkeypatch.setattr(grouped_moe, "default_tiling", _table_picking_mosaic)
  np.testing.assert_array_equal(run(), run(tiling=TRITON_TILES))
  with pytest.raises(ValueError, match="FP8 intermediate only"):
    run(tiling=MOSAIC_TILES)
