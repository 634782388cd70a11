"""DeepSeek grouped sigmoid routing and the local routing plan, as pure functions with static shapes.

Nothing here reads a routing value on the host, so callers can `jit`, `vmap` and `shard_map` it; the
plan's capacity is the worst case (every pick local), and `num_valid` says how much of it is used.
`route` and `plan_local` are the public, checked entries; the library's cores call `grouped_topk` and
`sort_local_pairs`, which trust their (already checked) inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_pallas import validation
from moe_pallas.config import MoEConfig

# SPEC.md step 4: dropped groups are masked to the most negative float32 (not -inf, so that the
# masked scores still order and never produce NaN in later arithmetic).
_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


# Above this many tokens, top-k by repeated argmax (k fused reductions over [T, n]) beats XLA:GPU's
# sort-based lax.top_k (measured on H100 at T=14107, [T, 256], k=8: 151 us for the sort); below it the
# sort is one small kernel against k. Both give the largest values, equal values to the lower index.
_ARGMAX_TOP_K_MIN_TOKENS = 1024


def _top_k_indices(x: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest entries of the last axis, in descending order, ties to the lower index."""
  if x.shape[0] < _ARGMAX_TOP_K_MIN_TOKENS:
    return jax.lax.top_k(x, k)[1]
  positions = jnp.arange(x.shape[-1], dtype=jnp.int32)
  picks = []
  for _ in range(k):
    index = jnp.argmax(x, axis=-1).astype(jnp.int32)  # argmax returns the first (lowest) maximum
    picks.append(index)
    x = jnp.where(positions == index[..., None], -jnp.inf, x)
  return jnp.stack(picks, axis=-1)


def _top2_sum(x: jax.Array) -> jax.Array:
  """Sum of the two largest entries of the last axis (an equal pair counts twice), as two reductions."""
  positions = jnp.arange(x.shape[-1], dtype=jnp.int32)
  first = jnp.argmax(x, axis=-1).astype(jnp.int32)
  largest = jnp.max(x, axis=-1)
  second = jnp.max(jnp.where(positions == first[..., None], -jnp.inf, x), axis=-1)
  return largest + second


def route(routing_logits: jax.Array, routing_bias: jax.Array, *, config: MoEConfig,
          routed_scaling_factor) -> tuple[jax.Array, jax.Array]:
  """DeepSeek-V3 grouped top-k routing over all global experts (SPEC.md steps 2-5), in float32.

  Args:
    routing_logits: [T, E] float32 router logits.
    routing_bias: [E] score-correction bias (bfloat16 or float32); used for selection only.
    config: supplies top_k, n_group, topk_group (E comes from the shape and must match).
    routed_scaling_factor: scalar multiplying the normalized weights.

  Returns:
    topk_ids: [T, top_k] int32 global expert ids, in descending biased score; equal scores go to
      the lower index.
    topk_weights: [T, top_k] float32, `s / (sum of the top_k picks' s + 1e-20) * routed_scaling_factor`
      with the unbiased sigmoid score `s`, summed over all picks, local or not.

  Raises:
    ValueError / TypeError naming the argument, the expected and the received value: logits not [T, E] of a
    float dtype, E != config.num_experts, a bias that is not [E] bfloat16/float32, config not a MoEConfig,
    a factor that is not a real scalar (or, when concrete, not finite).
  """
  validation.check_route(routing_logits, routing_bias, config=config, routed_scaling_factor=routed_scaling_factor)
  return grouped_topk(routing_logits, routing_bias, config=config, routed_scaling_factor=routed_scaling_factor)


def grouped_topk(routing_logits: jax.Array, routing_bias: jax.Array, *, config: MoEConfig,
                 routed_scaling_factor) -> tuple[jax.Array, jax.Array]:
  """`route`'s computation, for checked inputs (the library's traced cores)."""
  num_tokens = routing_logits.shape[0]
  scores = jax.nn.sigmoid(routing_logits.astype(jnp.float32))
  biased = scores + routing_bias.astype(jnp.float32)[None, :]

  grouped = biased.reshape(num_tokens, config.n_group, config.experts_per_group)
  group_scores = _top2_sum(grouped)
  kept_groups = _top_k_indices(group_scores, config.topk_group)
  group_kept = jnp.any(kept_groups[:, :, None] == jnp.arange(config.n_group)[None, None, :], axis=1)
  expert_kept = jnp.repeat(group_kept, config.experts_per_group, axis=1)
  masked = jnp.where(expert_kept, biased, _MASKED_SCORE)

  topk_ids = _top_k_indices(masked, config.top_k)
  picked = jnp.take_along_axis(scores, topk_ids, axis=1)
  factor = jnp.asarray(routed_scaling_factor, jnp.float32)
  topk_weights = picked / (jnp.sum(picked, axis=1, keepdims=True) + 1e-20) * factor
  return topk_ids.astype(jnp.int32), topk_weights


def nan_poison(routing_logits: jax.Array, routing_bias: jax.Array) -> jax.Array:
  """[T] float32: NaN for tokens whose routing inputs hold a NaN, else 0.0. Every layer adds it to each row.

  Routing is discrete, and a NaN in its inputs would otherwise pick experts silently (a comparison with NaN
  is false, so top-k just skips or keeps it), giving finite but wrong rows. The layer instead adds this
  vector to every element of each token's float32 output row, before the bf16 rounding: 0.0 changes
  nothing (x + 0.0 == x; -0.0 + 0.0 is +0.0, which compares equal), NaN turns the whole row NaN.

  - A NaN in `routing_logits[t]` poisons token t only.
  - A NaN anywhere in `routing_bias` enters every token's selection, so it poisons every token.
  - +-inf logits are valid (the sigmoid saturates to 1 or 0) and poison nothing.
  - A +-inf bias is not NaN and poisons nothing: it is outside SPEC.md's inputs (the checkpoint loader
    rejects it); the layer does not look for it.

  Args:
    routing_logits: [T, E] float.
    routing_bias: [E] float (bfloat16 or float32).

  Returns:
    [T] float32 of 0.0 and NaN. Pure and shape-static: computed on device, no host read.
  """
  bias_has_nan = jnp.any(jnp.isnan(routing_bias))
  token_has_nan = jnp.any(jnp.isnan(routing_logits), axis=-1)
  return jnp.where(token_has_nan | bias_has_nan, jnp.float32(jnp.nan), jnp.float32(0.0))


class RoutingPlan(NamedTuple):
  """This rank's (token, expert) pairs, sorted by local expert. R = T * top_k rows of capacity.

  Invariant: rows [group_offsets[e], group_offsets[e + 1]) hold local expert e's pairs in token order;
  rows [num_valid, R) are padding with token 0, expert `num_local_experts` and weight 0.
  """

  token_ids: jax.Array      # [R] int32: the token each sorted row reads and writes
  expert_ids: jax.Array     # [R] int32: local expert of each row; num_local_experts for padding rows
  weights: jax.Array        # [R] float32: routing weight of each row; 0 for padding rows
  group_sizes: jax.Array    # [E_local] int32: rows per local expert
  group_offsets: jax.Array  # [E_local + 1] int32: exclusive prefix sum of group_sizes
  num_valid: jax.Array      # [] int32: local pairs, = group_offsets[-1]
  pair_rows: jax.Array      # [T, top_k] int32: sorted row of pick (t, j); R where the pick is not local

  @property
  def capacity(self) -> int:
    return self.token_ids.shape[0]

  @property
  def num_local_experts(self) -> int:
    return self.group_sizes.shape[0]


def plan_local(topk_ids: jax.Array, topk_weights: jax.Array, *, local_expert_offset,
               num_local_experts: int) -> RoutingPlan:
  """Keeps the picks of experts offset .. offset + num_local_experts - 1 and sorts them by expert.

  Non-local picks are dropped, not renormalized (SPEC.md step 5). `local_expert_offset` may be traced
  (e.g. a shard's axis index times E_local); an offset outside [0, E - E_local] simply selects the
  experts that fall in range, possibly none.

  Args:
    topk_ids: [T, top_k] int global expert ids.
    topk_weights: [T, top_k] float32.
    local_expert_offset: scalar int, global id of local expert 0.
    num_local_experts: static E_local.

  Returns:
    A RoutingPlan with capacity T * top_k.

  Raises:
    ValueError / TypeError: num_local_experts not a positive int, topk_ids not [T, top_k] integers,
    topk_weights not floats of the same shape, an offset that is not an integer scalar.
  """
  validation.check_plan_local(topk_ids, topk_weights, local_expert_offset=local_expert_offset,
                              num_local_experts=num_local_experts)
  return sort_local_pairs(topk_ids, topk_weights, local_expert_offset=local_expert_offset,
                          num_local_experts=num_local_experts)


def sort_local_pairs(topk_ids: jax.Array, topk_weights: jax.Array, *, local_expert_offset,
                     num_local_experts: int) -> RoutingPlan:
  """`plan_local`'s computation, for checked inputs (the library's traced cores)."""
  num_tokens, top_k = topk_ids.shape
  capacity = num_tokens * top_k
  local_ids = topk_ids.astype(jnp.int32) - jnp.asarray(local_expert_offset, jnp.int32)
  is_local = (local_ids >= 0) & (local_ids < num_local_experts)
  # Non-local picks sort after every local expert, in one bucket of their own.
  sort_keys = jnp.where(is_local, local_ids, num_local_experts).reshape(capacity)
  order = jnp.argsort(sort_keys, stable=True).astype(jnp.int32)  # sorted row -> flat pair index

  sorted_keys = sort_keys[order]
  valid_rows = sorted_keys < num_local_experts
  token_ids = jnp.where(valid_rows, order // top_k, 0)
  weights = jnp.where(valid_rows, topk_weights.astype(jnp.float32).reshape(capacity)[order], 0.0)

  group_sizes = jnp.zeros((num_local_experts + 1,), jnp.int32).at[sort_keys].add(1)[:num_local_experts]
  group_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes, dtype=jnp.int32)])

  rows_of_pairs = jnp.zeros((capacity,), jnp.int32).at[order].set(jnp.arange(capacity, dtype=jnp.int32))
  pair_rows = jnp.where(is_local, rows_of_pairs.reshape(num_tokens, top_k), capacity)
  return RoutingPlan(token_ids=token_ids, expert_ids=sorted_keys, weights=weights, group_sizes=group_sizes,
                     group_offsets=group_offsets, num_valid=group_offsets[-1], pair_rows=pair_rows)
