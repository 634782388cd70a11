"""The fused routing kernels compute exactly what route -> plan_local -> make_tile_schedule compute.

Exactly, in interpret mode (both sides are the same float32 operations on the CPU). Compiled on a GPU, the
kernel's sigmoid and its sum of the top_k picks may round differently from XLA's in the last bits: there
the expert ids and every integer map must still be equal, the weights to 1e-6 relative.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_pallas as mp
from moe_pallas import testing
from moe_pallas.kernels import fused_routing, grouped_moe
from moe_pallas.kernels.schedule import make_tile_schedule

WEIGHT_RTOL_COMPILED = 1e-6  # float32 is 6e-8 per rounding; a handful of roundings apart


def _assert_same_schedule(got, want, interpret):
  for field in want._fields:
    g, w = np.asarray(getattr(got, field)), np.asarray(getattr(want, field))
    if field == "row_weight" and not interpret:
      np.testing.assert_allclose(g, w, rtol=WEIGHT_RTOL_COMPILED, atol=0, err_msg=field)
    else:
      np.testing.assert_array_equal(g, w, err_msg=field)


# Each draw with one M-tile size (both sizes on one draw), not every draw with both (~9-15 s a case in
# interpret mode); the tables use 16 rows up to T=80 on the H200, 64 above and on the H100. The default
# (layout folded into place) on every draw; the three-kernel form, a tuning option no table sets, on the
# four draws that reach its edges (one token, several blocks, every pick local, none local): 12 cases.
_SCHEDULE_DRAWS = [
    (mp.SMALL, 1, 0, "uniform", 16), (mp.SMALL, 300, 8, "skewed", 64), (mp.SMALL, 17, 24, "all_local", 16),
    (mp.SMALL, 9, 8, "no_local", 64),
]
_MORE_SCHEDULE_DRAWS = [
    (mp.SMALL, 40, 8, "uniform", 16), (mp.SMALL, 40, 8, "uniform", 64), (mp.DEEPSEEK_V3, 57, 96, "uniform", 16),
    (mp.DEEPSEEK_V3, 5, 32, "all_local", 64),
]


@pytest.mark.parametrize("config,num_tokens,offset,scenario,block_m,layout_in_place", [
    *(pytest.param(*draw, False, id=f"three_kernels-{index}") for index, draw in enumerate(_SCHEDULE_DRAWS)),
    *(pytest.param(*draw, True, id=f"layout_in_place-{index}")
      for index, draw in enumerate(_SCHEDULE_DRAWS + _MORE_SCHEDULE_DRAWS)),
])
def test_fused_schedule_equals_xla_schedule(config, num_tokens, offset, scenario, block_m, layout_in_place,
                                            interpret):
  logits, bias, _, _ = testing.random_activations(config, num_tokens, seed=1000 + num_tokens + block_m,
                                                  local_expert_offset=offset, scenario=scenario)
  ids, weights = mp.route(logits, bias, config=config, routed_scaling_factor=2.5)
  got, fused_ids, fused_weights, _ = fused_routing.route_and_schedule(
      logits, bias, 2.5, offset, config=config, num_local_experts=config.num_local_experts, block_m=block_m,
      layout_in_place=layout_in_place, interpret=interpret)
  np.testing.assert_array_equal(np.asarray(fused_ids), np.asarray(ids))
  # The same float32 operations; the normalizing sum may add in another order (1-2 ulp).
  np.testing.assert_allclose(np.asarray(fused_weights), np.asarray(weights),
                             rtol=5e-7 if interpret else WEIGHT_RTOL_COMPILED, atol=0)

  plan = mp.plan_local(ids, weights, local_expert_offset=offset, num_local_experts=config.num_local_experts)
  _assert_same_schedule(got, make_tile_schedule(plan, block_m=block_m), interpret)


def test_fused_routing_ties_go_to_the_lower_index(interpret):
  config = mp.SMALL
  logits = jnp.zeros((3, config.num_experts), jnp.float32).at[1].set(1.0)  # every score equal within a token
  bias = jnp.zeros((config.num_experts,), jnp.float32)
  ids, _ = mp.route(logits, bias, config=config, routed_scaling_factor=2.5)
  _, fused_ids, _, _ = fused_routing.route_and_schedule(logits, bias, 2.5, 0, config=config,
                                                     num_local_experts=config.num_local_experts, block_m=16,
                                                     interpret=interpret)
  np.testing.assert_array_equal(np.asarray(fused_ids), np.asarray(ids))
  assert (np.asarray(fused_ids) == np.arange(config.top_k)).all()  # groups 0.., experts 0.. first


def test_layer_with_and_without_fused_routing_agrees(interpret):
  config = mp.SMALL
  inputs = testing.random_layer_inputs(config, 33, seed=7, scenario="skewed", local_expert_offset=8)
  runs = [grouped_moe.moe_layer_triton(*inputs, jnp.int32(8), jnp.float32(2.5), config=config, interpret=interpret,
                                       fused_routing_kernels=fused) for fused in (True, False)]
  if interpret:
    np.testing.assert_array_equal(np.asarray(runs[0]), np.asarray(runs[1]))
  else:  # routing weights 1e-6 apart can move a bf16 output by one rounding step (2**-8 relative)
    np.testing.assert_allclose(np.asarray(runs[0], np.float32), np.asarray(runs[1], np.float32), rtol=2**-7,
                               atol=1e-6 * float(np.abs(np.asarray(runs[1], np.float32)).max()))


@pytest.mark.parametrize("num_tokens,layout_in_place", [(1, True), (2, True), (40, True), (40, False)],
                         ids=["route_layout_place", "route_layout_place_2", "layout_place", "three_kernels"])
@pytest.mark.parametrize("num_zeros", [1, 700])
def test_schedule_carries_zeroed_arrival_counters(num_tokens, layout_in_place, num_zeros, interpret):
  """`num_zeros`: int32 zeros written by the routing kernels (by XLA where layout is its own kernel), for the
  stream-K GEMM1's in-kernel fix-up; the schedule is unchanged. (Interpret mode fills outputs a kernel leaves
  unwritten with iinfo(int32).min, so a missed store fails here.)"""
  config = mp.SMALL
  logits, bias, _, _ = testing.random_activations(config, num_tokens, seed=3, local_expert_offset=8)
  route = functools.partial(fused_routing.route_and_schedule, logits, bias, 2.5, 8, config=config,
                            num_local_experts=config.num_local_experts, block_m=16, layout_in_place=layout_in_place,
                            interpret=interpret)
  want, _, _, _ = route()
  got, _, _, _ = route(num_zeros=num_zeros)
  assert want.arrival_counters is None
  counters = np.asarray(got.arrival_counters)
  assert counters.dtype == np.int32 and counters.shape == (num_zeros,) and (counters == 0).all()
  _assert_same_schedule(got._replace(arrival_counters=None), want, interpret)


@pytest.mark.parametrize("tokens_per_block,tiles_per_step,route_warps", [(1, 256, None), (16, 1024, None),
                                                                        (2, 256, 1)])
def test_fused_schedule_tuning_variants_agree(tokens_per_block, tiles_per_step, route_warps, interpret):
  config = mp.DEEPSEEK_V3
  logits, bias, _, _ = testing.random_activations(config, 23, seed=5, local_expert_offset=96)
  ids, weights = mp.route(logits, bias, config=config, routed_scaling_factor=2.5)
  plan = mp.plan_local(ids, weights, local_expert_offset=96, num_local_experts=config.num_local_experts)
  want = make_tile_schedule(plan, block_m=16)
  got, _, _, _ = fused_routing.route_and_schedule(logits, bias, 2.5, 96, config=config,
                                               num_local_experts=config.num_local_experts, block_m=16,
                                               tokens_per_block=tokens_per_block, tiles_per_step=tiles_per_step,
                                               route_warps=route_warps, layout_in_place=route_warps is None,
                                               interpret=interpret)
  _assert_same_schedule(got, want, interpret)


@pytest.mark.parametrize("num_tokens", [3, 7])
def test_one_program_routing_up_to_the_bound_equals_xla_schedule(num_tokens, monkeypatch, interpret):
  """With T <= ONE_PROGRAM_MAX_TOKENS the default is one block of T tokens padded to a power of two: route +
  layout + place as one program (`moe_route_layout_place`), the same schedule as XLA's."""
  monkeypatch.setattr(fused_routing, "ONE_PROGRAM_MAX_TOKENS", 8)
  config = mp.DEEPSEEK_V3
  logits, bias, _, _ = testing.random_activations(config, num_tokens, seed=7, local_expert_offset=32)
  ids, weights = mp.route(logits, bias, config=config, routed_scaling_factor=2.5)
  plan = mp.plan_local(ids, weights, local_expert_offset=32, num_local_experts=config.num_local_experts)
  call = functools.partial(fused_routing.route_and_schedule, logits, bias, 2.5, 32, config=config,
                           num_local_experts=config.num_local_experts, block_m=16, interpret=interpret)
  got, got_ids, got_weights, _ = call()
  _assert_same_schedule(got, make_tile_schedule(plan, block_m=16), interpret)
  np.testing.assert_array_equal(np.asarray(got_ids), np.asarray(ids))
  np.testing.assert_allclose(np.asarray(got_weights), np.asarray(weights), rtol=1e-6)
  kernels = set(re.findall(r"name=(moe_\w+)", str(jax.make_jaxpr(lambda: call())())))
  assert kernels == {"moe_route_layout_place"}, kernels


@pytest.mark.parametrize("blocks_per_chunk", [4, 16])
@pytest.mark.parametrize("layout_in_place", [False, True])
def test_layout_in_chunks_equals_xla_schedule(blocks_per_chunk, layout_in_place, monkeypatch, interpret):
  """More blocks than `layout` holds as one tile (T > 1024 at DeepSeek-V3's shape) are laid out by a
  program per chunk (`layout_sums`, `layout`; `layout_in_place` then falls back to separate kernels)."""
  monkeypatch.setattr(fused_routing, "_BLOCKS_PER_CHUNK", blocks_per_chunk)
  config = mp.SMALL
  logits, bias, _, _ = testing.random_activations(config, 150, seed=11, local_expert_offset=8, scenario="skewed")
  ids, weights = mp.route(logits, bias, config=config, routed_scaling_factor=2.5)
  plan = mp.plan_local(ids, weights, local_expert_offset=8, num_local_experts=config.num_local_experts)
  got, _, _, _ = fused_routing.route_and_schedule(logits, bias, 2.5, 8, config=config,
                                               num_local_experts=config.num_local_experts, block_m=16,
                                               tokens_per_block=4, layout_in_place=layout_in_place,
                                               interpret=interpret)  # 38 blocks
  _assert_same_schedule(got, make_tile_schedule(plan, block_m=16), interpret)


@pytest.mark.parametrize("where", ["logit", "bias", "inf_logits"])
def test_fused_poison_equals_nan_poison(where, interpret):
  config = mp.SMALL
  logits, bias, _, _ = testing.random_activations(config, 21, seed=9, local_expert_offset=8)
  if where == "logit":
    logits = logits.at[5, 3].set(jnp.nan)
  elif where == "bias":
    bias = bias.at[30].set(jnp.nan)
  else:  # +-inf logits are valid: nothing poisoned
    logits = logits.at[2, 0].set(jnp.inf).at[7, 1].set(-jnp.inf)
  *_, poison = fused_routing.route_and_schedule(logits, bias, 2.5, 8, config=config,
                                                num_local_experts=config.num_local_experts, block_m=16,
                                                interpret=interpret)
  want = np.asarray(mp.routing.nan_poison(logits, bias))
  np.testing.assert_array_equal(np.isnan(np.asarray(poison)), np.isnan(want))
  assert np.isnan(want).any() == (where != "inf_logits")
  np.testing.assert_array_equal(np.asarray(poison)[~np.isnan(want)], 0.0)
