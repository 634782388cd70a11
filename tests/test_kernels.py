"""The kernel tier ("triton" implementation): each kernel against its jnp counterpart, the tile schedule's
invariants, and the whole layer against the float64 oracle. The `interpret` fixture (tests/conftest.py) runs
the kernels compiled on a GPU (compute capability >= 8.9) and in Pallas' interpret mode elsewhere; the
bounds below hold for both (they come from SPEC.md's FP8/bf16 arithmetic, not from one machine's results)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_pallas as mp
from moe_pallas import reference, testing
from moe_pallas.kernels import combine, grouped_gemm, grouped_moe, schedule, tiling, triton_internals
from moe_pallas.testing.oracle import oracle_moe

# A second small preset with other group geometry: 64 experts in 8 groups (keep 3), 16 local, top-6.
WIDE = mp.MoEConfig(hidden=384, intermediate=256, num_experts=64, num_local_experts=16, top_k=6, n_group=8,
                    topk_group=3)
FP8_BOUND = 3.5e-2   # SPEC.md: SwiGLU output re-quantized to FP8 before GEMM2
BF16_BOUND = 1e-2    # SPEC.md: SwiGLU output kept in bf16


def _plan(inputs, config, offset, factor=2.5):
  ids, weights = mp.route(inputs.routing_logits, inputs.routing_bias, config=config, routed_scaling_factor=factor)
  return mp.plan_local(ids, weights, local_expert_offset=offset, num_local_experts=config.num_local_experts)


# ---- the FP8 dot primitives ----------------------------------------------------------------------------


def test_dot_primitives_are_registered_with_pallas_triton():
  triton_internals.check_pallas_triton_internals()
  from jax._src.pallas.triton import lowering
  for primitive in (triton_internals.dot_nt_p, triton_internals.fma_p):
    assert primitive in lowering.triton_lowering_rules, primitive


def test_dot_primitives_match_jnp(seed):
  """The primitives' XLA implementation (what interpret mode runs) against a float64 product.

  Bound: a product of two e4m3 values has at most 4 + 4 significant bits, so it is exact in float32; only the
  K - 1 float32 additions round, and |err| <= K * 2^-24 * sum_k |a_k b_k| (the standard summation bound).
  The dot runs at matmul precision "highest": at XLA's default precision a GPU runs this FP8 x FP8 -> f32
  dot on cuBLASLt with fast (reduced-precision) accumulation, measured 1.1e-2 off on the H200 (3.5 % on a
  near-zero element), which is the library's choice, not the primitive's. The Triton rule (the compiled
  kernels' dot) is certified by the kernel and layer tests below, which run compiled on a GPU.
  """
  k = jax.random.split(jax.random.key(seed), 3)
  a = testing.inputs._fp8_normal(k[0], (64, 128))
  b = testing.inputs._fp8_normal(k[1], (32, 128))
  acc = jax.random.normal(k[2], (64, 32))
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  want = a64 @ b64.T
  bound = a64.shape[1] * 2.0**-24 * (np.abs(a64) @ np.abs(b64).T)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(triton_internals.dot_nt(a, b), np.float64)
  excess = np.abs(got - want) - bound
  assert (excess <= 0).all(), f"max |err| - bound = {excess.max():.3e}"
  # One rounding of x * y + z in float32 (relative 2^-24; 3 * acc is exact to one more rounding).
  np.testing.assert_allclose(triton_internals.fma(acc, 2.0, acc), 3 * np.asarray(acc), rtol=2 * 2.0**-24)
  with pytest.raises(ValueError, match="b \\[N, K\\]"):
    triton_internals.dot_nt(a, b.T)


# ---- the tile schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["uniform", "skewed", "all_local"])
@pytest.mark.parametrize("num_tokens", [1, 5, 300])
def test_tile_schedule_invariants(seed, scenario, num_tokens):
  config = mp.SMALL
  block_m = 16
  inputs = testing.random_activations(config, num_tokens, seed=seed, scenario=scenario,
                                      local_expert_offset=8)
  ids, weights = mp.route(inputs[0], inputs[1], config=config, routed_scaling_factor=2.5)
  plan = mp.plan_local(ids, weights, local_expert_offset=8, num_local_experts=config.num_local_experts)
  sched = schedule.make_tile_schedule(plan, block_m=block_m)
  tile_expert = np.asarray(sched.tile_expert)
  sizes = np.asarray(plan.group_sizes)
  used = int(sched.num_used_tiles)

  assert sched.num_tiles == schedule.max_tiles(plan.capacity, config.num_local_experts, block_m)
  assert used == sum(-(-int(n) // block_m) for n in sizes) <= sched.num_tiles
  # Used tiles come first, in expert order; each expert gets exactly ceil(n_e / block_m) tiles.
  assert (tile_expert[used:] == config.num_local_experts).all()
  assert (np.diff(tile_expert[:used]) >= 0).all()
  for e in range(config.num_local_experts):
    assert (tile_expert == e).sum() == -(-int(sizes[e]) // block_m), e
  # An expert that no token picked has no tile, so no kernel program ever reads its weights.
  untouched = set(np.flatnonzero(sizes == 0))
  assert not untouched & set(tile_expert[:used].tolist())

  # Every local pick (t, j) lands on a padded row of its expert that reads token t with its weight.
  ids_np, w_np = np.asarray(ids), np.asarray(weights)
  rows = np.asarray(sched.pair_padded_row)
  row_token, row_weight = np.asarray(sched.row_token), np.asarray(sched.row_weight)
  local = (ids_np >= 8) & (ids_np < 8 + config.num_local_experts)
  assert (rows[~local] == sched.num_rows).all()
  for t, j in zip(*np.nonzero(local)):
    r = rows[t, j]
    assert tile_expert[r // block_m] == ids_np[t, j] - 8
    assert row_token[r] == t and row_weight[r] == w_np[t, j]
  assert len(set(rows[local].tolist())) == int(local.sum())
  # Padding rows carry weight 0.
  assert np.count_nonzero(row_weight) == int(local.sum())


# ---- each kernel against its jnp counterpart --------------------------------------------------------


@pytest.fixture(scope="module")
def small_weights():
  return testing.random_weights(mp.SMALL, seed=1234)


def _kernel_inputs(seed, num_tokens=40, scenario="skewed"):
  config = mp.SMALL
  acts = testing.random_activations(config, num_tokens, seed=seed, scenario=scenario,
                                    local_expert_offset=8)
  ids, weights = mp.route(acts[0], acts[1], config=config, routed_scaling_factor=2.5)
  plan = mp.plan_local(ids, weights, local_expert_offset=8, num_local_experts=config.num_local_experts)
  return acts, plan


@pytest.mark.parametrize("block_n,split_k", [(32, 1), (64, 1), (128, 1), (64, 2), (128, 2)])
def test_gemm1_swiglu_matches_jnp(seed, small_weights, block_n, split_k, interpret):
  acts, plan = _kernel_inputs(seed)
  w1, w1s, _, _ = small_weights
  tiles = tiling.GemmTiling(block_m=16, block_n=block_n, split_k=split_k)
  sched = schedule.make_tile_schedule(plan, block_m=16)
  values, scales = grouped_gemm.gemm1_swiglu(sched.tile_expert, sched.row_token, acts[2], acts[3], w1, w1s,
                                             tiling=tiles, interpret=interpret)
  got = np.asarray(values, np.float64) * np.repeat(np.asarray(scales, np.float64).T, block_n, axis=1)

  a = np.asarray(reference.dequantize_activations(acts[2], acts[3]), np.float64)
  w13 = np.asarray(mp.dequantize(mp.BlockScaledArray(w1, w1s, (128, 128))), np.float64)
  valid = np.asarray(sched.row_weight) != 0
  experts = np.repeat(np.asarray(sched.tile_expert), 16)
  tokens = np.asarray(sched.row_token)
  want = np.stack([a[tokens[r]] @ w13[experts[r]].T for r in np.flatnonzero(valid)])
  half = want.shape[1] // 2
  want = want[:, half:] / (1 + np.exp(-want[:, half:])) * want[:, :half]  # silu on the second half
  err = np.linalg.norm(got[valid] - want) / np.linalg.norm(want)
  assert err < 4e-2, err  # FP8 re-quantization of the output, 1 x block_n blocks


@pytest.mark.parametrize("split_k", [1, 2])
def test_gemm2_weighted_matches_jnp(seed, small_weights, split_k, interpret):
  acts, plan = _kernel_inputs(seed)
  _, _, w2, w2s = small_weights
  sched = schedule.make_tile_schedule(plan, block_m=16)
  rows = sched.num_rows
  key = jax.random.key(seed)
  c = testing.inputs._fp8_normal(key, (rows, mp.SMALL.intermediate))
  c_scale = jax.random.normal(jax.random.fold_in(key, 1), (mp.SMALL.intermediate // 64, rows))
  tiles = tiling.GemmTiling(block_m=16, block_n=64, block_k=64, split_k=split_k)
  partials = np.asarray(grouped_gemm.gemm2_weighted(sched.tile_expert, c, c_scale, w2, w2s, sched.row_weight,
                                                    tiling=tiles, interpret=interpret), np.float64)
  assert partials.shape == (split_k * rows, mp.SMALL.hidden)
  got = partials.reshape(split_k, rows, -1).sum(axis=0)  # the K ranges' partial sums, as the combine adds them
  c_full = np.asarray(c, np.float64) * np.repeat(np.asarray(c_scale, np.float64).T, 64, axis=1)
  w2_full = np.asarray(mp.dequantize(mp.BlockScaledArray(w2, w2s, (128, 128))), np.float64)
  experts = np.repeat(np.asarray(sched.tile_expert), 16)
  weights = np.asarray(sched.row_weight, np.float64)
  used = np.flatnonzero(experts < mp.SMALL.num_local_experts)
  want = np.stack([weights[r] * (c_full[r] @ w2_full[experts[r]].T) for r in used])
  # |err| <= u * sum_k |terms|: FP8 x FP8 products are exact, then the accumulation rounds. Interpret mode
  # accumulates in float32 (K additions + 3 scale multiplies, u = (K + 3) 2^-24); the compiled kernel's wgmma
  # accumulates each block_k-long FP8 dot in Hopper's reduced-precision accumulator (about 13-14 mantissa
  # bits, DeepSeek-V3 report section 3.3.2), worst case u = block_k * 2^-13, then adds the scaled blocks
  # in float32. A wrong tile, scale or row is O(1) off.
  abs_terms = np.stack([abs(weights[r]) * (np.abs(c_full[r]) @ np.abs(w2_full[experts[r]]).T) for r in used])
  unit = tiles.block_k * 2.0**-13 if not interpret else (mp.SMALL.intermediate + 3) * 2.0**-24
  excess = np.abs(got[used] - want) - unit * abs_terms
  assert (excess <= 0).all(), f"max |err| - bound = {excess.max():.3e} (unit {unit:.2e})"


_COMBINE_TILINGS = {"masked": tiling.CombineTiling(),
                    "branch": tiling.CombineTiling(block_t=1, block_h=128, branch_per_pick=True)}


@pytest.mark.parametrize("tiles", sorted(_COMBINE_TILINGS))
@pytest.mark.parametrize("num_tokens", [1, 17, 64])
def test_combine_matches_jnp(seed, num_tokens, tiles, interpret):
  key = jax.random.key(seed)
  num_rows, hidden, top_k = 96, 256, 4
  tiles = _COMBINE_TILINGS[tiles]
  rows = jax.random.normal(key, (num_rows, hidden))
  pair_padded_row = jax.random.randint(jax.random.fold_in(key, 1), (num_tokens, top_k), 0, num_rows + 1)
  got = combine.combine_rows(rows, pair_padded_row, tiling=tiles, interpret=interpret)
  # GEMM2's split-K partials: the same rows as two halves that sum to them.
  half = jax.random.normal(jax.random.fold_in(key, 2), (num_rows, hidden))
  split = combine.combine_rows(jnp.concatenate([half, rows - half]), pair_padded_row, num_splits=2,
                               tiling=tiles, interpret=interpret)
  np.testing.assert_allclose(split, got, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="num_splits"):
    combine.combine_rows(rows[:95], pair_padded_row, num_splits=2, interpret=interpret)
  r, p = np.asarray(rows, np.float64), np.asarray(pair_padded_row)
  want = np.stack([sum((r[i] for i in p[t] if i < num_rows), np.zeros(hidden)) for t in range(num_tokens)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  bf16 = combine.combine_rows(rows, pair_padded_row, out_dtype=jnp.bfloat16, tiling=tiles, interpret=interpret)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(bf16, jnp.asarray(got).astype(jnp.bfloat16))  # rounded once, from float32
  # A NaN-poisoned token's row is NaN, the others' unchanged.
  poison = jnp.zeros((num_tokens,), jnp.float32).at[num_tokens // 2].set(jnp.nan)
  poisoned = np.asarray(combine.combine_rows(rows, pair_padded_row, poison=poison, tiling=tiles, interpret=interpret))
  assert np.isnan(poisoned[num_tokens // 2]).all()
  np.testing.assert_array_equal(np.delete(poisoned, num_tokens // 2, 0), np.delete(np.asarray(got), num_tokens // 2, 0))


def test_combine_branches_agree_bit_for_bit(seed, interpret):
  """The branch-per-pick combine sums the same rows in the same order as the masked one."""
  key = jax.random.key(seed)
  rows = jax.random.normal(key, (64, 512)).astype(jnp.bfloat16)
  pair_padded_row = jax.random.randint(jax.random.fold_in(key, 1), (33, 8), 0, 2 * 64)  # ~half not local
  pair_padded_row = jnp.minimum(pair_padded_row, 64)
  masked = combine.combine_rows(rows, pair_padded_row, tiling=tiling.CombineTiling(block_t=8, block_h=256),
                                interpret=interpret)
  branch = combine.combine_rows(rows, pair_padded_row, tiling=tiling.CombineTiling(1, 256, branch_per_pick=True),
                                interpret=interpret)
  np.testing.assert_array_equal(branch, masked)
  with pytest.raises(ValueError, match="branch_per_pick needs block_t=1"):
    tiling.CombineTiling(block_t=2, branch_per_pick=True)


def test_tiling_rejects_inconsistent_blocks():
  with pytest.raises(ValueError, match="block_n must divide 128"):
    tiling.GemmTiling(block_n=96)
  mixed = tiling.MoETiling(gemm1=tiling.GemmTiling(block_n=64), gemm2=tiling.GemmTiling(block_k=128))
  mixed.check_intermediate(quantized=False)  # a bf16 intermediate has no quantization block to follow
  with pytest.raises(ValueError, match="gemm2.block_k must equal gemm1.block_n"):
    mixed.check_intermediate(quantized=True)
  with pytest.raises(ValueError, match="share the tile schedule"):
    tiling.MoETiling(gemm1=tiling.GemmTiling(block_m=64), gemm2=tiling.GemmTiling(block_m=128))
  with pytest.raises(ValueError, match="split_k must be >= 1, got 0"):
    tiling.GemmTiling(split_k=0)


@pytest.mark.parametrize("device_kind", ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "cpu"])
def test_default_tiling_fits_every_hidden_size(device_kind):
  """The tables are measured at DeepSeek-V3's H and I; at any other, each GEMM's split_k divides its K steps."""
  for num_tokens in (1, 7, 16, 57, 901, 14107):
    for hidden, most in ((7168, 4), (256, 2), (384, 3), (128, 1), (640, 1)):
      tiles = tiling.default_tiling(num_tokens, 8, 32, device_kind=device_kind, hidden=hidden)
      assert (hidden // 128) % tiles.gemm1.split_k == 0 and tiles.gemm1.split_k <= most
    for intermediate in (2048, 256, 128, 384):
      tiles = tiling.default_tiling(num_tokens, 8, 32, device_kind=device_kind, intermediate=intermediate)
      assert (intermediate // tiles.gemm2.block_k) % tiles.gemm2.split_k == 0
  assert tiling.default_tiling(1, 8, 32, device_kind="NVIDIA H200", hidden=7168).gemm1.stream_k == 1
  assert tiling.default_tiling(1, 8, 32, device_kind="NVIDIA H200", intermediate=2048).gemm2.split_k == 2
  assert tiling.default_tiling(1, 8, 32, device_kind="NVIDIA H200", intermediate=128).gemm2.split_k == 1


@pytest.mark.parametrize("num_tokens", [1, 13])
def test_h200_default_tiling_runs_the_small_shape(seed, num_tokens, monkeypatch):
  """The H200 table (split-K at T=1, the device-picked GEMM1 launch above) at the SMALL shape, on any host."""
  h200 = lambda *args, **kwargs: tiling.default_tiling(*args, **{**kwargs, "device_kind": "NVIDIA H200"})
  monkeypatch.setattr(grouped_moe, "default_tiling", h200)
  _check_layer(mp.SMALL, num_tokens, seed, "uniform", 8, jnp.float8_e4m3fn)


def test_h200_default_tiling_with_no_local_pick(seed, monkeypatch):
  """T=1 (the stream-K GEMM1) with no pick of a local expert: no used tile to share, exact zeros out."""
  h200 = lambda *args, **kwargs: tiling.default_tiling(*args, **{**kwargs, "device_kind": "NVIDIA H200"})
  monkeypatch.setattr(grouped_moe, "default_tiling", h200)
  assert tiling.default_tiling(1, mp.SMALL.top_k, mp.SMALL.num_local_experts, "NVIDIA H200").gemm1.stream_k
  _check_layer(mp.SMALL, 1, seed, "no_local", 8, jnp.float8_e4m3fn)


@pytest.mark.parametrize("split_k,k_unroll", [(3, 1), (2, 2)])
def test_gemm1_k_ranges_must_divide_k_steps(seed, small_weights, split_k, k_unroll):
  """Each of the split_k K ranges holds whole groups of k_unroll K steps (H=256: 2 K steps)."""
  acts, plan = _kernel_inputs(seed)
  w1, w1s, _, _ = small_weights
  sched = schedule.make_tile_schedule(plan, block_m=16)
  with pytest.raises(ValueError, match=rf"split_k \* tiling.k_unroll must divide the 2 K steps of H=256, got "
                                       rf"split_k={split_k}, k_unroll={k_unroll}"):
    grouped_gemm.gemm1_swiglu(sched.tile_expert, sched.row_token, acts[2], acts[3], w1, w1s,
                              tiling=tiling.GemmTiling(block_m=16, split_k=split_k, k_unroll=k_unroll), interpret=True)


def test_k_unroll_gives_the_same_bits(seed, small_weights, interpret):
  """K steps loaded together (`GemmTiling.k_unroll`) run the same FMAs in the same order as one at a time."""
  acts, plan = _kernel_inputs(seed)
  w1, w1s, w2, w2s = small_weights
  sched = schedule.make_tile_schedule(plan, block_m=16)
  gemm1 = lambda **kw: grouped_gemm.gemm1_swiglu(sched.tile_expert, sched.row_token, acts[2], acts[3], w1, w1s,
                                                 tiling=tiling.GemmTiling(block_m=16, block_n=64, **kw),
                                                 interpret=interpret)
  values, scales = gemm1()
  unrolled_values, unrolled_scales = gemm1(k_unroll=2)  # H=256: both K steps in one iteration
  valid = np.asarray(sched.row_weight) != 0
  assert np.isfinite(np.asarray(scales)[:, valid]).all() and np.asarray(scales)[:, valid].max() > 0
  np.testing.assert_array_equal(np.asarray(unrolled_values)[valid], np.asarray(values)[valid])
  np.testing.assert_array_equal(np.asarray(unrolled_scales)[:, valid], np.asarray(scales)[:, valid])

  # GEMM1's 1 x 64 scales, read by a 32-wide K step: each covers two of GEMM2's steps.
  scales = jnp.repeat(scales, 2, axis=0)
  gemm2 = lambda **kw: np.asarray(grouped_gemm.gemm2_weighted(
      sched.tile_expert, values, scales, w2, w2s, sched.row_weight,
      tiling=tiling.GemmTiling(block_m=16, block_n=64, block_k=32, **kw), interpret=interpret))
  rows = np.flatnonzero(np.repeat(np.asarray(sched.tile_expert), 16) < mp.SMALL.num_local_experts)
  want = gemm2()
  assert np.abs(want[rows]).max() > 0
  for kw in (dict(k_unroll=2), dict(k_unroll=4), dict(k_unroll=2, split_k=2)):
    got = gemm2(**kw)
    if kw.get("split_k"):  # each K range's partials by themselves, as without k_unroll
      np.testing.assert_array_equal(got, gemm2(split_k=2), err_msg=str(kw))
    else:
      np.testing.assert_array_equal(got[rows], want[rows], err_msg=str(kw))


def _assert_same_products(got, want, interpret, **tolerance):
  """Elementwise within `tolerance` in interpret mode (float32 sums in another order); compiled, the fp8 MMA
  accumulates each K step in reduced precision, differently for another shape: relative L2 below 2e-3."""
  if interpret:
    np.testing.assert_allclose(got, want, **tolerance)
  else:
    relative_l2 = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert relative_l2 < 2e-3, relative_l2


def test_swap_ab_gives_the_same_products(seed, small_weights, interpret):
  """`GemmTiling.swap_ab` (each K step's product computed transposed, W tile @ rows.T): GEMM1's bf16 SwiGLU
  and GEMM2's float32 rows equal the untransposed kernels' up to float32 summation order in interpret mode;
  compiled, the fp8 MMA of the other shape accumulates each K step in its own reduced precision (H200: 12 of
  12160 GEMM1 outputs off by 1-4 %), so there the bound is on the relative L2 difference."""
  acts, plan = _kernel_inputs(seed)
  w1, w1s, w2, w2s = small_weights
  sched = schedule.make_tile_schedule(plan, block_m=16)
  valid = np.asarray(sched.row_weight) != 0
  for block_n, split_k in ((64, 1), (128, 2)):
    gemm1 = lambda **kw: np.asarray(grouped_gemm.gemm1_swiglu(
        sched.tile_expert, sched.row_token, acts[2], acts[3], w1, w1s, out_dtype=jnp.bfloat16, interpret=interpret,
        tiling=tiling.GemmTiling(block_m=16, block_n=block_n, split_k=split_k, **kw))[0], np.float32)[valid]
    want = gemm1()
    assert np.abs(want).max() > 0
    _assert_same_products(gemm1(swap_ab=True), want, interpret, rtol=2**-7, atol=1e-6 * np.abs(want).max())

  values, scales = grouped_gemm.gemm1_swiglu(sched.tile_expert, sched.row_token, acts[2], acts[3], w1, w1s,
                                             tiling=tiling.GemmTiling(block_m=16, block_n=64), interpret=interpret)
  rows = np.flatnonzero(np.repeat(np.asarray(sched.tile_expert), 16) < mp.SMALL.num_local_experts)
  for block_n, split_k in ((64, 1), (128, 2)):
    gemm2 = lambda **kw: np.asarray(grouped_gemm.gemm2_weighted(
        sched.tile_expert, values, scales, w2, w2s, sched.row_weight, interpret=interpret,
        tiling=tiling.GemmTiling(block_m=16, block_n=block_n, block_k=64, split_k=split_k, **kw)))
    want = gemm2()
    num_rows = len(sched.row_token)
    rows_of_splits = np.concatenate([rows + s * num_rows for s in range(split_k)])
    assert np.abs(want[rows]).max() > 0
    _assert_same_products(gemm2(swap_ab=True)[rows_of_splits], want[rows_of_splits], interpret, rtol=1e-5,
                          atol=1e-6 * np.abs(want[rows]).max())


def test_gemm2_bf16_rows_and_their_combine(seed, small_weights, interpret):
  """GEMM2 with bfloat16 out: its float32 rows rounded once; the combine sums bfloat16 rows in float32."""
  acts, plan = _kernel_inputs(seed)
  _, _, w2, w2s = small_weights
  sched = schedule.make_tile_schedule(plan, block_m=16)
  key = jax.random.key(seed)
  c = testing.inputs._fp8_normal(key, (sched.num_rows, mp.SMALL.intermediate))
  c_scale = jax.random.normal(jax.random.fold_in(key, 1), (mp.SMALL.intermediate // 64, sched.num_rows))
  gemm2 = functools.partial(grouped_gemm.gemm2_weighted, sched.tile_expert, c, c_scale, w2, w2s, sched.row_weight,
                            tiling=tiling.GemmTiling(block_m=16, block_n=64, block_k=64), interpret=interpret)
  rows = np.flatnonzero(np.repeat(np.asarray(sched.tile_expert), 16) < mp.SMALL.num_local_experts)
  f32, bf16 = gemm2(), gemm2(out_dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16 and np.abs(np.asarray(f32)[rows]).max() > 0
  np.testing.assert_array_equal(np.asarray(bf16)[rows], np.asarray(f32)[rows].astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="out_dtype must be float32 or bfloat16, got float16"):
    gemm2(out_dtype=jnp.float16)
  pair_row = sched.pair_padded_row
  summed = combine.combine_rows(bf16, pair_row, interpret=interpret)
  np.testing.assert_array_equal(summed, combine.combine_rows(bf16.astype(jnp.float32), pair_row, interpret=interpret))
  with pytest.raises(ValueError, match="rows must be float32 or bfloat16, got float16"):
    combine.combine_rows(bf16.astype(jnp.float16), pair_row, interpret=interpret)


def test_in_kernel_fixup_gives_the_layers_bits(seed):
  """The whole layer with the stream-K fix-up done by the last-arriving program (`fixup_in_kernel`) gives the
  bits of the fix-up kernel, a NaN-poisoned row included."""
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 24, seed=seed, scenario="skewed", local_expert_offset=8)
  logits = np.asarray(inputs.routing_logits).copy()
  logits[3, 0] = np.nan  # token 3's row NaN (routing.nan_poison)
  inputs = inputs._replace(routing_logits=jnp.asarray(logits))
  base = tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=64, stream_k=2),
                          tiling.GemmTiling(block_m=16, block_n=64, block_k=64, split_k=2))
  in_kernel = dataclasses.replace(base, gemm1=dataclasses.replace(base.gemm1, fixup_in_kernel=True))
  run = lambda tiles: np.asarray(grouped_moe.moe_layer_triton(*inputs, 8, 2.5, config=config, tiling=tiles,
                                                              interpret=testing.interpret_mode()), np.float32)
  want, got = run(base), run(in_kernel)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  assert np.isnan(got[3]).all() and np.abs(np.delete(got, 3, axis=0)).max() > 0


def test_k_unroll_is_checked():
  with pytest.raises(ValueError, match="k_unroll must be >= 1"):
    tiling.GemmTiling(k_unroll=0)
  with pytest.raises(ValueError, match="1 with stream_k"):
    tiling.GemmTiling(k_unroll=2, stream_k=1)


# ---- the whole layer against the float64 oracle ----------------------------------------------------------


def _check_layer(config, num_tokens, seed, scenario, offset, intermediate_dtype, tiles=None):
  inputs = testing.random_layer_inputs(config, num_tokens, seed=seed, scenario=scenario, local_expert_offset=offset)
  if tiles is None:
    out = mp.moe_layer(*inputs, local_expert_offset=offset, routed_scaling_factor=2.5, config=config,
                       implementation="triton", interpret=testing.interpret_mode(),
                       intermediate_dtype=intermediate_dtype)
  else:
    plan = _plan(inputs, config, offset)
    out = grouped_moe.apply_local_experts_triton(*inputs[2:], plan, interpret=testing.interpret_mode(),
                                                 tiling=tiles,
                                                 out_dtype=jnp.bfloat16, intermediate_dtype=intermediate_dtype)
  assert out.shape == (num_tokens, config.hidden) and out.dtype == jnp.bfloat16
  ref = oracle_moe(*inputs, local_expert_offset=offset, routed_scaling_factor=2.5, top_k=config.top_k,
                   n_group=config.n_group, topk_group=config.topk_group)
  metrics = testing.acceptance_metrics(out, ref)
  bound = FP8_BOUND if jnp.dtype(intermediate_dtype) == jnp.float8_e4m3fn else BF16_BOUND
  print(f"T={num_tokens} {scenario} {jnp.dtype(intermediate_dtype).name}: matched "
        f"{metrics['matched_ratio']:.4f}, rel_l2 {metrics['rel_l2']:.2e}")
  assert metrics["passed"], metrics
  assert metrics["rel_l2"] < bound, metrics
  no_local = ~np.asarray(ref).any(axis=1)
  assert (np.asarray(out, np.float32)[no_local] == 0).all()  # tokens with no local expert: exact zeros
  return out


@pytest.mark.parametrize("num_tokens,scenario", [(1, "uniform"), (3, "skewed"), (64, "uniform"),
                                                 (64, "all_local"), (300, "skewed")])
def test_layer_matches_oracle_small(seed, num_tokens, scenario):
  _check_layer(mp.SMALL, num_tokens, seed, scenario, 8, jnp.float8_e4m3fn)


@pytest.mark.parametrize("num_tokens,scenario", [(3, "uniform"), (300, "all_local")])
def test_layer_matches_oracle_bf16_intermediate(seed, num_tokens, scenario):
  _check_layer(mp.SMALL, num_tokens, seed, scenario, 16, jnp.bfloat16)


@pytest.mark.parametrize("num_tokens,scenario", [(5, "uniform"), (100, "skewed")])
def test_layer_matches_oracle_wide_preset(seed, num_tokens, scenario):
  _check_layer(WIDE, num_tokens, seed, scenario, 16, jnp.float8_e4m3fn)


@pytest.mark.parametrize("tiles", [
    tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=32), tiling.GemmTiling(block_m=16, block_n=32, block_k=32)),
    tiling.MoETiling(tiling.GemmTiling(block_m=32, block_n=128, group_m=3),
                     tiling.GemmTiling(block_m=32, block_n=128, group_m=5)),
    tiling.default_tiling(50, 4, 8, device_kind="NVIDIA H200"),
    tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=128, split_k=2),
                     tiling.GemmTiling(block_m=16, block_n=64, block_k=128)),
    tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=64),
                     tiling.GemmTiling(block_m=16, block_n=64, block_k=64, split_k=2)),
    tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=64), tiling.GemmTiling(block_m=16, block_n=64, block_k=64),
                     gemm1_busy=tiling.GemmTiling(block_m=16, block_n=64, num_warps=8, group_m=2), busy_min_tiles=1),
    tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=64), tiling.GemmTiling(block_m=16, block_n=64, block_k=64),
                     gemm1_busy=tiling.GemmTiling(block_m=16, block_n=64, num_warps=8, group_m=2),
                     busy_min_tiles=10**6),
    tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=64, stream_k=2),
                     tiling.GemmTiling(block_m=16, block_n=64, block_k=64)),
    tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=64, k_unroll=2),
                     tiling.GemmTiling(block_m=16, block_n=64, block_k=64, k_unroll=2)),
    tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=64),
                     tiling.GemmTiling(block_m=16, block_n=64, block_k=64, split_k=2), bf16_rows=True),
    tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=64, stream_k=2, fixup_in_kernel=True),
                     tiling.GemmTiling(block_m=16, block_n=64, block_k=64, split_k=2)),
    tiling.MoETiling(tiling.GemmTiling(block_m=16, block_n=64, swap_ab=True),
                     tiling.GemmTiling(block_m=16, block_n=128, block_k=64, swap_ab=True),
                     gemm1_busy=tiling.GemmTiling(block_m=16, block_n=64, num_warps=8, swap_ab=True),
                     busy_min_tiles=3, bf16_rows=True),
], ids=["narrow", "grouped", "h200_small_t", "split_k", "gemm2_split_k", "busy_gemm1_picked",
        "busy_gemm1_not_picked", "gemm1_stream_k", "k_unroll", "bf16_rows", "in_kernel_fixup", "swap_ab"])
def test_layer_matches_oracle_other_tilings(seed, tiles):
  _check_layer(mp.SMALL, 50, seed, "skewed", 8, jnp.float8_e4m3fn, tiles=tiles)


def test_gemm1_used_tiles_range_picks_the_call_that_writes(seed, small_weights, interpret):
  """Outside its used-tile range a GEMM1 call leaves `into` as it was; inside, it writes every used row."""
  acts, plan = _kernel_inputs(seed)
  w1, w1s, _, _ = small_weights
  sched = schedule.make_tile_schedule(plan, block_m=16)
  tiles = tiling.GemmTiling(block_m=16)
  args = (sched.tile_expert, sched.row_token, acts[2], acts[3], w1, w1s)
  plain = grouped_gemm.gemm1_swiglu(*args, tiling=tiles, interpret=interpret)
  used = int(sched.num_used_tiles)
  sentinel = (jnp.full(plain[0].shape, 3.0, plain[0].dtype), jnp.full(plain[1].shape, -7.0, plain[1].dtype))
  kwargs = dict(tiling=tiles, interpret=interpret, used_tiles=sched.num_used_tiles)
  skipped = grouped_gemm.gemm1_swiglu(*args, used_tiles_range=(used + 1, 2**31 - 1), into=sentinel, **kwargs)
  for got, want in zip(skipped, sentinel):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  picked = grouped_gemm.gemm1_swiglu(*args, used_tiles_range=(used, used + 1), into=sentinel, **kwargs)
  valid = np.asarray(sched.row_weight) != 0
  np.testing.assert_array_equal(np.asarray(picked[0], np.float32)[valid], np.asarray(plain[0], np.float32)[valid])
  np.testing.assert_array_equal(np.asarray(picked[1])[:, valid], np.asarray(plain[1])[:, valid])
  with pytest.raises(ValueError, match="gemm1_busy must have gemm1's blocks"):
    tiling.MoETiling(gemm1=tiles, gemm1_busy=tiling.GemmTiling(block_m=32), busy_min_tiles=4)
  with pytest.raises(ValueError, match="busy_min_tiles must be >= 1"):
    tiling.MoETiling(gemm1=tiles, gemm1_busy=tiles)
  with pytest.raises(ValueError, match="gemm1_busy.swap_ab must equal gemm1.swap_ab"):
    tiling.MoETiling(gemm1=tiles, gemm1_busy=dataclasses.replace(tiles, num_warps=8, swap_ab=True), busy_min_tiles=4)


def test_best_available_falls_back_to_xla_where_kernels_cannot_run(seed, monkeypatch, interpret):
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 11, seed=seed, local_expert_offset=8)

  def unsupported(*args, **kwargs):
    raise NotImplementedError("not covered by the kernels")

  monkeypatch.setattr(grouped_moe, "apply_local_experts_triton", unsupported)
  monkeypatch.setattr(grouped_moe, "moe_layer_triton", unsupported)
  kwargs = dict(local_expert_offset=8, routed_scaling_factor=2.5, config=config, interpret=interpret)
  best = mp.moe_layer(*inputs, implementation=None, **kwargs)
  np.testing.assert_array_equal(np.asarray(best), np.asarray(mp.moe_layer(*inputs, implementation="xla", **kwargs)))
  with pytest.raises(NotImplementedError, match="not covered"):
    mp.moe_layer(*inputs, implementation="triton", **kwargs)


@pytest.mark.skipif(testing.interpret_mode(), reason="interpret mode computes no Pallas-Triton offsets; the GPU "
                    "test run (scripts/gpu_tests.sh) compiles this case")
def test_experts_past_int32_offsets_are_read_where_they_are(seed):
  """128 local experts (two GPUs' share): W13's last experts lie past 2**31 elements, where int32 offsets
  wrap. Their output must equal the same experts' as a small array of 8 (no wrap), bit for bit."""
  config, num_local, top_k, num_tokens = mp.DEEPSEEK_V3, 128, 8, 8
  h, i = config.hidden, config.intermediate
  keys = jax.random.split(jax.random.key(seed), 6)

  def fp8(key, shape):  # random bits with the sign and lowest exponent bit cleared: finite, |x| <= 240
    return jax.lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint8) & 0x77, jnp.float8_e4m3fn)

  w13, w2 = fp8(keys[0], (num_local, 2 * i, h)), fp8(keys[1], (num_local, h, i))
  w13_scale = jax.random.uniform(keys[2], (num_local, 2 * i // 128, h // 128), minval=1e-4, maxval=2e-4)
  w2_scale = jax.random.uniform(keys[3], (num_local, h // 128, i // 128), minval=1e-4, maxval=2e-4)
  acts = fp8(keys[4], (num_tokens, h))
  acts_scale = jax.random.uniform(keys[5], (h // 128, num_tokens), minval=1e-3, maxval=2e-3)
  assert triton_internals.int32_offsets_overflow(w13.shape, w13.dtype)
  ids = jnp.broadcast_to(jnp.arange(num_local - top_k, num_local, dtype=jnp.int32), (num_tokens, top_k))
  weights = jnp.full((num_tokens, top_k), 1.0 / top_k, jnp.float32)
  tiles = tiling.default_tiling(num_tokens, top_k, top_k, hidden=h)
  # The arrays are arguments, not closed-over constants: XLA would constant-fold the slices of a 3.8 GB
  # constant (the first GPU test run of this case did not finish in 230 s).
  @functools.partial(jax.jit, static_argnums=(0, 1))
  def run(first, count, acts, acts_scale, w13, w13_scale, w2, w2_scale):
    sl = lambda x: x[first:first + count]
    plan = mp.plan_local(ids, weights, local_expert_offset=first, num_local_experts=count)
    return grouped_moe.apply_local_experts_triton(acts, acts_scale, sl(w13), sl(w13_scale), sl(w2), sl(w2_scale),
                                                  plan, tiling=tiles)
  arrays = (acts, acts_scale, w13, w13_scale, w2, w2_scale)
  whole = np.asarray(run(0, num_local, *arrays))
  last_eight = np.asarray(run(num_local - top_k, top_k, *arrays))
  assert np.isfinite(whole).all() and np.abs(whole).max() > 0
  np.testing.assert_array_equal(whole, last_eight)


def test_int32_offset_overflow_rule():
  assert not triton_internals.int32_offsets_overflow((32, 4096, 7168), jnp.float8_e4m3fn)   # 0.94 GB
  assert triton_internals.int32_offsets_overflow((128, 4096, 7168), jnp.float8_e4m3fn)      # 3.76 GB
  assert not triton_internals.int32_offsets_overflow((256, 4096, 7168), jnp.float8_e4m3fn)  # 7.5 GB: int64
  assert not triton_internals.int32_offsets_overflow((300_000, 7168), jnp.float32)          # 8.6 GB: int64


def test_wide_offsets_for_arrays_int32_cannot_index():
  """Pallas-Triton's offset rule is wrapped: a 2**31+ element array of <= 2**32 bytes is sized as 4-byte
  elements (64-bit offsets, same element offsets); every other array reaches the stock rule unchanged."""
  from jax._src.pallas.triton import lowering
  wrapped = lowering._compute_offsets_from_indices
  assert wrapped.moe_pallas_stock is not None
  seen = []
  check = triton_internals._wide_offsets(lambda block_info, indexer: seen.append(block_info) or indexer)
  for shape, dtype, wide in (((128, 4096, 7168), jnp.float8_e4m3fn, True), ((32, 4096, 7168), jnp.float8_e4m3fn, False),
                             ((300_000, 7168), jnp.float32, False)):
    info = lowering.BlockInfo(full_shape_dtype=jax.core.ShapedArray(shape, dtype), start_indices=(None,) * len(shape),
                              start_indices_alignment=(1,) * len(shape), block_shape=shape)
    assert check(info, "indexer") == "indexer"
    passed = seen[-1].full_shape_dtype
    assert passed.shape == shape
    assert (math.prod(shape) * passed.dtype.itemsize > 2**32) == (wide or math.prod(shape) * jnp.dtype(dtype).itemsize > 2**32)
    assert (passed.dtype == jnp.dtype(dtype)) != wide


def test_untouched_experts_are_never_read(seed, interpret):
  """NaN weights in every expert that no token picked leave the output unchanged (and finite)."""
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 2, seed=seed, local_expert_offset=8)
  plan = _plan(inputs, config, 8)
  untouched = np.asarray(plan.group_sizes) == 0
  assert untouched.any() and not untouched.all()
  poison = jnp.asarray(untouched)[:, None, None]
  nan8 = jnp.asarray(jnp.nan, jnp.float8_e4m3fn)
  w1 = jnp.where(poison, nan8, inputs.gemm1_weights)
  w2 = jnp.where(poison, nan8, inputs.gemm2_weights)
  w1s = jnp.where(poison, jnp.nan, inputs.gemm1_weights_scale)
  clean = mp.moe_layer(*inputs, local_expert_offset=8, routed_scaling_factor=2.5, config=config,
                       implementation="triton", interpret=interpret)
  poisoned = mp.moe_layer(*inputs[:4], w1, w1s, w2, inputs.gemm2_weights_scale, local_expert_offset=8,
                          routed_scaling_factor=2.5, config=config, implementation="triton", interpret=interpret)
  assert np.isfinite(np.asarray(poisoned, np.float32)).all()
  np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))


def test_zero_tokens_and_traced_offset(seed, interpret):
  config = mp.SMALL
  empty = testing.random_layer_inputs(config, 0, seed=seed, local_expert_offset=8)
  out = mp.moe_layer(*empty, local_expert_offset=8, routed_scaling_factor=2.5, config=config,
                     implementation="triton", interpret=interpret)
  assert out.shape == (0, config.hidden) and out.dtype == jnp.bfloat16

  inputs = testing.random_layer_inputs(config, 7, seed=seed, local_expert_offset=8)
  run = jax.jit(lambda offset, *x: mp.moe_layer(*x, local_expert_offset=offset, routed_scaling_factor=2.5,
                                                config=config, implementation="triton", interpret=interpret))
  traced = run(jnp.int32(8), *inputs)
  direct = mp.moe_layer(*inputs, local_expert_offset=8, routed_scaling_factor=2.5, config=config,
                        implementation="triton", interpret=interpret)
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(direct))
  # An out-of-range traced offset selects no local expert: all-zero output, not an error or garbage.
  assert not np.asarray(run(jnp.int32(config.num_experts), *inputs), np.float32).any()


def test_interpret_layer_is_one_program_without_host_callbacks(seed):
  # Interpret mode's program, on purpose on every backend; the GPU program itself is checked in
  # test_gpu_lowering.py (lowered for an abstract GPU).
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 9, seed=seed, local_expert_offset=8)
  lowered = jax.jit(lambda *x: mp.moe_layer(*x, local_expert_offset=8, routed_scaling_factor=2.5, config=config,
                                            implementation="triton", interpret=True)).lower(*inputs)
  text = lowered.as_text()
  for marker in ("callback", "host_compute", "infeed", "outfeed", "send", "recv"):
    assert marker not in text.lower(), marker
