"""The stream-K GEMM1 (`kernels/stream_k.py`): against the one-program-per-tile GEMM1 and a float64 product, with
shares that split items into two or more pieces, whole items, and more programs than K steps (empty shares)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import moe_pallas as mp
from moe_pallas import reference, testing
from moe_pallas.kernels import grouped_gemm, schedule, stream_k, tiling

# 6 K steps (H=768) and 4 N-tiles of 64 (I=256): items of several pieces at few programs.
CONFIG = mp.MoEConfig(hidden=768, intermediate=256, num_experts=32, num_local_experts=8, top_k=4, n_group=4,
                      topk_group=2)


@pytest.fixture(scope="module")
def weights():
  return testing.random_weights(CONFIG, seed=77)


def _inputs(seed, num_tokens):
  acts = testing.random_activations(CONFIG, num_tokens, seed=seed, scenario="skewed", local_expert_offset=8)
  ids, routing_weights = mp.route(acts[0], acts[1], config=CONFIG, routed_scaling_factor=2.5)
  plan = mp.plan_local(ids, routing_weights, local_expert_offset=8, num_local_experts=CONFIG.num_local_experts)
  return acts, schedule.make_tile_schedule(plan, block_m=16)


def _swiglu_f64(acts, sched, w1, w1s):
  a = np.asarray(reference.dequantize_activations(acts[2], acts[3]), np.float64)
  w13 = np.asarray(mp.dequantize(mp.BlockScaledArray(w1, w1s, (128, 128))), np.float64)
  experts = np.repeat(np.asarray(sched.tile_expert), 16)
  tokens = np.asarray(sched.row_token)
  valid = np.asarray(sched.row_weight) != 0
  h = np.stack([a[tokens[r]] @ w13[experts[r]].T for r in np.flatnonzero(valid)])
  half = h.shape[1] // 2
  return valid, h[:, half:] / (1 + np.exp(-h[:, half:])) * h[:, :half]  # silu on the second half


@pytest.mark.parametrize("num_tokens,stream_k_per_sm,num_sms", [
    (40, 1, 3),    # 3 programs: each item's 6 steps in one or two pieces, shares of many items
    (40, 3, 7),    # 21 programs: items in two or three pieces
    (1, 8, 5),     # 40 programs for 1-4 tiles x 4 N-tiles x 6 steps: items in 3-4 pieces, some shares empty
    (1, 16, 11),   # 176 programs: items in ~15 pieces, most shares empty
])
def test_stream_k_gemm1_matches_one_program_per_tile(seed, weights, num_tokens, stream_k_per_sm, num_sms, interpret,
                                                      monkeypatch):
  monkeypatch.setattr(schedule, "_INTERPRET_NUM_SMS", num_sms)
  acts, sched = _inputs(seed, num_tokens)
  w1, w1s, _, _ = weights
  args = (sched.tile_expert, sched.row_token, acts[2], acts[3], w1, w1s)
  plain = tiling.GemmTiling(block_m=16, block_n=64)
  streamed = tiling.GemmTiling(block_m=16, block_n=64, stream_k=stream_k_per_sm)
  valid, want = _swiglu_f64(acts, sched, w1, w1s)

  # bf16 out: the same sums up to float32 rounding (the pieces add in another order), then one bf16 rounding.
  got_bf16, _ = stream_k.gemm1_swiglu(*args, sched.num_used_tiles, tiling=streamed, out_dtype=jnp.bfloat16,
                                      interpret=interpret)
  plain_bf16, _ = grouped_gemm.gemm1_swiglu(*args, tiling=plain, out_dtype=jnp.bfloat16, interpret=interpret)
  got_bf16, plain_bf16 = (np.asarray(x, np.float64)[valid] for x in (got_bf16, plain_bf16))
  np.testing.assert_allclose(got_bf16, plain_bf16, rtol=2**-7, atol=1e-6 * np.abs(plain_bf16).max())
  assert np.linalg.norm(got_bf16 - want) / np.linalg.norm(want) < 1e-2

  # FP8 out (1 x 64 blocks): against the float64 product, as the per-tile GEMM1's test bounds it.
  values, scales = stream_k.gemm1_swiglu(*args, sched.num_used_tiles, tiling=streamed, interpret=interpret)
  got = np.asarray(values, np.float64) * np.repeat(np.asarray(scales, np.float64).T, 64, axis=1)
  err = np.linalg.norm(got[valid] - want) / np.linalg.norm(want)
  assert err < 4e-2, err

  # The fix-up inside the kernel (the last piece to arrive sums them all): the same order, the same bits.
  in_kernel = dataclasses.replace(streamed, fixup_in_kernel=True)
  got_values, got_scales = stream_k.gemm1_swiglu(*args, sched.num_used_tiles, tiling=in_kernel, interpret=interpret)
  np.testing.assert_array_equal(np.asarray(got_values)[valid], np.asarray(values)[valid])
  np.testing.assert_array_equal(np.asarray(got_scales)[:, valid], np.asarray(scales)[:, valid])

  # Each piece's product transposed (`swap_ab`, transposed back before its slot or epilogue): the same sums up
  # to float32 order in interpret mode; compiled, within the fp8 MMA's accumulation (bounded by relative L2:
  # the 16-row tile and its transpose run on different MMA instructions, which round the fp8 sums apart; the
  # H200 measured 2.07e-3 at T=1, 176 programs; a wrong product or scale is off by O(1)).
  swapped_bf16, _ = stream_k.gemm1_swiglu(*args, sched.num_used_tiles, out_dtype=jnp.bfloat16, interpret=interpret,
                                          tiling=dataclasses.replace(in_kernel, swap_ab=True))
  swapped_bf16 = np.asarray(swapped_bf16, np.float64)[valid]
  assert np.linalg.norm(swapped_bf16 - got_bf16) / np.linalg.norm(got_bf16) < 4e-3
  assert np.linalg.norm(swapped_bf16 - want) / np.linalg.norm(want) < 1e-2


def test_stream_k_tiling_is_checked():
  with pytest.raises(ValueError, match="fixup_in_kernel needs stream_k >= 1"):
    tiling.GemmTiling(block_m=16, fixup_in_kernel=True)
  with pytest.raises(ValueError, match="stream_k must be >= 0, and 0 with a split_k above 1"):
    tiling.GemmTiling(block_m=16, split_k=2, stream_k=1)
  with pytest.raises(ValueError, match="stream_k is GEMM1's only"):
    tiling.MoETiling(tiling.GemmTiling(block_m=16), tiling.GemmTiling(block_m=16, stream_k=1))
  with pytest.raises(ValueError, match="gemm1.stream_k needs the Triton GEMMs and no gemm1_busy"):
    tiling.MoETiling(tiling.GemmTiling(block_m=16, stream_k=1), tiling.GemmTiling(block_m=16),
                     gemm1_busy=tiling.GemmTiling(block_m=16, num_warps=8), busy_min_tiles=3)
  with pytest.raises(ValueError, match="stream_k.gemm1_swiglu needs tiling.stream_k >= 1"):
    stream_k.gemm1_swiglu(*([None] * 7), tiling=tiling.GemmTiling(block_m=16))


def test_stream_k_gemm1_checks_its_operands(weights):
  acts, sched = _inputs(3, 20)
  w1, w1s, _, _ = weights
  args = (sched.tile_expert, sched.row_token, acts[2], acts[3], w1, w1s, sched.num_used_tiles)
  with pytest.raises(ValueError, match="gemm1_swiglu needs block_k = 128"):
    stream_k.gemm1_swiglu(*args, tiling=tiling.GemmTiling(block_m=16, block_k=64, stream_k=1), interpret=True)
  in_kernel = tiling.GemmTiling(block_m=16, block_n=64, stream_k=1, fixup_in_kernel=True)
  counters = stream_k.num_arrival_counters(in_kernel, sched.num_tiles, CONFIG.intermediate)
  assert counters == sched.num_tiles * CONFIG.intermediate // 64
  assert stream_k.num_arrival_counters(tiling.GemmTiling(block_m=16, stream_k=1), sched.num_tiles, 256) == 0
  with pytest.raises(ValueError, match=f"arrival_counters must be int32\\[{counters}\\] \\(M-tiles x N-tiles\\), got "
                                       f"int32\\[{counters - 1}\\]"):
    stream_k.gemm1_swiglu(*args, tiling=in_kernel, arrival_counters=jnp.zeros((counters - 1,), jnp.int32),
                          interpret=True)
  with pytest.raises(ValueError, match="arrival_counters must be int32.*got float32"):
    stream_k.gemm1_swiglu(*args, tiling=in_kernel, arrival_counters=jnp.zeros((counters,), jnp.float32),
                          interpret=True)
  with pytest.raises(ValueError, match="row_token has .* rows, expected num_tiles \\* block_m"):
    stream_k.gemm1_swiglu(*args, tiling=tiling.GemmTiling(block_m=32, stream_k=1), interpret=True)
