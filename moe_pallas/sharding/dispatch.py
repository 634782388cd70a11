"""Dispatch bookkeeping: where each token goes, and how much room the buckets get (pure, static shapes)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_pallas.config import MoEConfig

DEFAULT_CAPACITY_FACTOR = 1.25


class DispatchStats(NamedTuple):
  """What the dispatch did in one call (replicated scalars).

  Attributes:
    fell_back: bool; True when an all_to_all bucket overflowed and the call ran the all-gather strategy.
    max_bucket_tokens: int32; the most tokens one shard sent (or would have sent) to one destination shard.
    capacity: int32; tokens per (source, destination) bucket: C for all_to_all, T_local otherwise.
  """

  fell_back: jax.Array
  max_bucket_tokens: jax.Array
  capacity: jax.Array


class RaggedLayout(NamedTuple):
  """Offsets and sizes (rows, per peer) of one shard's two `ragged_all_to_all` calls.

  With S[i, d] the tokens shard i sends to shard d: a send buffer holds rows grouped by destination in
  destination order, a receive buffer holds rows grouped by source in source order, both without gaps.
  Dispatch sends `send_sizes[d]` rows from `input_offsets[d]` to `output_offsets[d]` on shard d; the
  results return from `recv_offsets[i]` (`recv_sizes[i]` rows) to `return_offsets[i]` on shard i.
  """

  input_offsets: jax.Array   # [P] sum_{d' < d} S[me, d']: where bucket d starts in my send buffer
  send_sizes: jax.Array      # [P] S[me, d]
  output_offsets: jax.Array  # [P] sum_{i < me} S[i, d]: where my rows land in d's receive buffer
  recv_sizes: jax.Array      # [P] S[i, me]
  recv_offsets: jax.Array    # [P] sum_{i' < i} S[i', me]: where source i's rows sit in my receive buffer
  return_offsets: jax.Array  # [P] sum_{d' < me} S[i, d']: where my results land in i's send buffer


def _exclusive_cumsum(x, axis):
  return jnp.cumsum(x, axis=axis, dtype=jnp.int32) - x


def bucket_slots(topk_ids: jax.Array, *, num_shards: int, experts_per_shard: int):
  """Where one shard's tokens go: the bookkeeping both all-to-all strategies share.

  Args:
    topk_ids: [T_local, top_k] int global expert ids; ids >= E (padding tokens) go nowhere.
    num_shards: P; expert e lives on shard e // experts_per_shard.
    experts_per_shard: E_local.

  Returns:
    goes_to: [T_local, P] bool, token t has at least one pick on shard d (it is sent there once).
    slot: [T_local, P] int32, t's rank among the tokens going to d, in token order (valid where goes_to).
    bucket_tokens: [P] int32, tokens going to each shard (S[me, :]).
  """
  shard_ids = jnp.arange(num_shards, dtype=jnp.int32)
  owner = topk_ids.astype(jnp.int32) // experts_per_shard
  goes_to = jnp.any(owner[:, :, None] == shard_ids[None, None, :], axis=1)
  slot = jnp.cumsum(goes_to, axis=0, dtype=jnp.int32) - 1
  return goes_to, slot, jnp.sum(goes_to, axis=0, dtype=jnp.int32)


def ragged_layout(send_counts: jax.Array, shard: jax.Array) -> RaggedLayout:
  """The `ragged_all_to_all` offsets and sizes of `shard` from the all-shard count matrix.

  Args:
    send_counts: [P, P] int32, S[i, d] = tokens shard i sends to shard d (the all-gathered bucket counts).
    shard: scalar int, this shard's expert-axis index (may be traced).
  """
  counts = send_counts.astype(jnp.int32)
  before_along_dest = _exclusive_cumsum(counts, axis=1)    # [i, d]: sum_{d' < d} S[i, d']
  before_along_source = _exclusive_cumsum(counts, axis=0)  # [i, d]: sum_{i' < i} S[i', d]
  return RaggedLayout(input_offsets=before_along_dest[shard], send_sizes=counts[shard],
                      output_offsets=before_along_source[shard], recv_sizes=counts[:, shard],
                      recv_offsets=before_along_source[:, shard], return_offsets=before_along_dest[:, shard])


def max_destinations_per_token(config: MoEConfig, num_shards: int) -> int:
  """D: the most expert-axis shards one token's picks can reach (a static bound used for capacities)."""
  experts_per_shard = config.num_experts // num_shards
  group = config.experts_per_group
  spans = sorted(((g * group + group - 1) // experts_per_shard - (g * group) // experts_per_shard + 1
                  for g in range(config.n_group)), reverse=True)
  return min(num_shards, config.top_k, sum(spans[:config.topk_group]))


def bucket_capacity(config: MoEConfig, *, num_shards: int, tokens_per_shard: int,
                    capacity_factor: float = DEFAULT_CAPACITY_FACTOR) -> int:
  """C, tokens per (source, destination) bucket: min(T_local, ceil(capacity_factor * T_local * D / P))."""
  destinations = max_destinations_per_token(config, num_shards)
  wanted = math.ceil(capacity_factor * tokens_per_shard * destinations / num_shards)
  return max(1, min(tokens_per_shard, wanted))
