"""The per-shard program (route, dispatch, local experts, return, combine) and its `shard_map` wrapper.

The strategies and their costs are described in the package docstring (`moe_pallas.sharding`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moe_pallas.layer import inference_only, local_expert_outputs
from moe_pallas.quant import LocalExperts
from moe_pallas.routing import grouped_topk, nan_poison, sort_local_pairs
from moe_pallas.sharding.dispatch import DispatchStats, bucket_slots, ragged_layout
from moe_pallas.validation import Checked

# The collective the ragged strategy calls, looked up when the program is traced. XLA:CPU lacks it, so CPU
# tests substitute an emulation here (tests/ragged_emulation.py); it is not part of the jit's static key.
ragged_all_to_all = jax.lax.ragged_all_to_all


class _RowFormat(NamedTuple):
  """A token row as bytes: fp8 activations [H], float32 scales [H/B], int32 ids [k], float32 weights [k]."""

  hidden: int
  scale_blocks: int
  top_k: int

  @property
  def num_bytes(self) -> int:
    return self.hidden + 4 * self.scale_blocks + 8 * self.top_k


def _as_bytes(x):
  if x.dtype.itemsize == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8)
  return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(x.shape[:-1] + (-1,))


def _from_bytes(x, dtype):
  dtype = jnp.dtype(dtype)
  if dtype.itemsize == 1:
    return jax.lax.bitcast_convert_type(x, dtype)
  return jax.lax.bitcast_convert_type(x.reshape(x.shape[:-1] + (-1, dtype.itemsize)), dtype)


def _pack_rows(hidden_states, scales_by_token, topk_ids, topk_weights):
  """One uint8 row per token, so that each exchange is one collective."""
  parts = (hidden_states, scales_by_token.astype(jnp.float32), topk_ids.astype(jnp.int32),
           topk_weights.astype(jnp.float32))
  return jnp.concatenate([_as_bytes(p) for p in parts], axis=1)


def _unpack_rows(rows, fmt: _RowFormat):
  h_end = fmt.hidden
  s_end = h_end + 4 * fmt.scale_blocks
  i_end = s_end + 4 * fmt.top_k
  return (_from_bytes(rows[:, :h_end], jnp.float8_e4m3fn), _from_bytes(rows[:, h_end:s_end], jnp.float32),
          _from_bytes(rows[:, s_end:i_end], jnp.int32), _from_bytes(rows[:, i_end:], jnp.float32))


class ShardStatic(NamedTuple):
  """Everything the per-shard program needs that is not an array (hashable: the jit's static key)."""

  checked: Checked           # the gate's result; config with num_local_experts = E / P, out_dtype float32
  num_shards: int            # P
  strategy: str
  capacity: int              # all_to_all bucket size C
  expert_axis: str
  token_axes: tuple          # mesh axes the tokens are split over (data axis first)


def _shard_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, token_valid,
                   experts: LocalExperts, routed_scaling_factor, *, st: ShardStatic):
  """One shard: T_local tokens in, their bf16 output rows [T_local, H] and the dispatch stats out."""
  config, num_shards = st.checked.config, st.num_shards
  num_tokens, hidden = hidden_states.shape
  num_local = config.num_local_experts
  fmt = _RowFormat(hidden, hidden_states_scale.shape[0], config.top_k)
  me = jax.lax.axis_index(st.expert_axis)

  topk_ids, topk_weights = grouped_topk(routing_logits, routing_bias, config=config,
                                        routed_scaling_factor=routed_scaling_factor)
  # Padding tokens (T rounded up to the shard count) pick the sentinel expert E, which no shard owns.
  topk_ids = jnp.where(token_valid[:, None], topk_ids, config.num_experts)
  topk_weights = jnp.where(token_valid[:, None], topk_weights, 0.0)
  rows = _pack_rows(hidden_states, hidden_states_scale.T, topk_ids, topk_weights)
  # Row T_local is an empty token (sentinel ids, zero weights): the filler of every unused buffer slot.
  empty_row = _pack_rows(jnp.zeros((1, hidden), hidden_states.dtype), jnp.zeros((1, fmt.scale_blocks)),
                         jnp.full((1, config.top_k), config.num_experts), jnp.zeros((1, config.top_k)))
  rows_ext = jnp.concatenate([rows, empty_row], axis=0)

  goes_to, slot, bucket_tokens = bucket_slots(topk_ids, num_shards=num_shards, experts_per_shard=num_local)
  shard_ids = jnp.arange(num_shards, dtype=jnp.int32)
  token_of = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], goes_to.shape)
  max_bucket = jax.lax.pmax(jnp.max(bucket_tokens), st.token_axes)

  def local_partials(received_rows):
    """The float32 partial outputs [N, H] of this shard's experts for N received token rows."""
    act, scales, ids, weights = _unpack_rows(received_rows, fmt)
    plan = sort_local_pairs(ids, weights, local_expert_offset=me * num_local, num_local_experts=num_local)
    return local_expert_outputs(act, scales.T, experts, plan, checked=st.checked)

  def combine(results, result_row):
    """out[t] = sum over t's destinations d, in shard order, of results[result_row[t, d]] (float32)."""
    results_ext = jnp.concatenate([results, jnp.zeros((1, hidden), jnp.float32)], axis=0)
    return jnp.sum(results_ext[result_row], axis=1)

  def all_gather_dispatch():
    everyone = jax.lax.all_gather(rows, st.expert_axis, tiled=True)  # [P * T_local, row bytes]
    return jax.lax.psum_scatter(local_partials(everyone), st.expert_axis, scatter_dimension=0, tiled=True)

  def all_to_all_dispatch():
    cap = st.capacity
    slot_id = jnp.where(goes_to & (slot < cap), shard_ids[None, :] * cap + slot, num_shards * cap)
    token_in_slot = jnp.full((num_shards * cap,), num_tokens, jnp.int32).at[slot_id].set(token_of, mode="drop")
    send = rows_ext[token_in_slot].reshape(num_shards, cap, fmt.num_bytes)
    received = jax.lax.all_to_all(send, st.expert_axis, 0, 0)  # [source, C, row bytes]
    results = local_partials(received.reshape(num_shards * cap, fmt.num_bytes))
    returned = jax.lax.all_to_all(results.reshape(num_shards, cap, hidden), st.expert_axis, 0, 0)
    return combine(returned.reshape(num_shards * cap, hidden), slot_id)

  def ragged_dispatch():
    layout = ragged_layout(jax.lax.all_gather(bucket_tokens, st.expert_axis), me)
    # A token has at most min(P, top_k) destinations and a shard receives at most T_local tokens from
    # each source, so neither buffer can overflow.
    send_rows = num_tokens * min(num_shards, config.top_k)
    recv_rows = num_tokens * num_shards
    send_row = jnp.where(goes_to, layout.input_offsets[None, :] + slot, send_rows)
    token_in_row = jnp.full((send_rows,), num_tokens, jnp.int32).at[send_row].set(token_of, mode="drop")
    received = ragged_all_to_all(
        rows_ext[token_in_row], jnp.broadcast_to(empty_row, (recv_rows, fmt.num_bytes)), layout.input_offsets,
        layout.send_sizes, layout.output_offsets, layout.recv_sizes, axis_name=st.expert_axis)
    returned = ragged_all_to_all(
        local_partials(received), jnp.zeros((send_rows, hidden), jnp.float32), layout.recv_offsets,
        layout.recv_sizes, layout.return_offsets, layout.send_sizes, axis_name=st.expert_axis)
    return combine(returned, send_row)

  fell_back = jnp.zeros((), jnp.bool_)
  if st.strategy == "all_gather":
    out = all_gather_dispatch()
  elif st.strategy == "all_to_all":
    fell_back = max_bucket > st.capacity  # the same value on every shard: all take the same branch
    out = jax.lax.cond(fell_back, all_gather_dispatch, all_to_all_dispatch)
  else:
    out = ragged_dispatch()
  # The NaN poison (routing.nan_poison) of this shard's own tokens, added once, by the shard that owns the
  # token, to its combined float32 row: a token whose logits (or the bias) hold a NaN comes out all NaN, as
  # in moe_layer. Padding tokens have zero logits; their rows are dropped.
  out = out + nan_poison(routing_logits, routing_bias)[:, None]
  capacity = st.capacity if st.strategy == "all_to_all" else num_tokens
  stats = DispatchStats(fell_back=fell_back, max_bucket_tokens=max_bucket,
                        capacity=jnp.asarray(capacity, jnp.int32))
  return out.astype(jnp.bfloat16), stats


@functools.partial(jax.jit, static_argnames=("mesh", "st"))
def sharded_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, experts: LocalExperts,
                    routed_scaling_factor, *, mesh, st: ShardStatic):
  """The whole sharded layer for checked inputs: pad the tokens, `shard_map` the per-shard program.

  Inference-only as a whole (`layer.inference_only`): the token rows travel as bytes (bitcasts), which would
  otherwise cut every tangent and give silent zero gradients instead of the layer's error.
  """
  routed_scaling_factor = jnp.asarray(routed_scaling_factor, jnp.float32)  # inside: no extra program per call
  return _sharded_core((mesh, st), routing_logits, routing_bias, hidden_states, hidden_states_scale, experts,
                       routed_scaling_factor)


@inference_only
def _sharded_core(static, routing_logits, routing_bias, hidden_states, hidden_states_scale, experts: LocalExperts,
                  routed_scaling_factor):
  mesh, st = static
  num_tokens = routing_logits.shape[0]
  num_token_shards = math.prod(mesh.shape[a] for a in st.token_axes)
  padded = -(-num_tokens // num_token_shards) * num_token_shards
  pad = padded - num_tokens
  routing_logits = jnp.pad(routing_logits, ((0, pad), (0, 0)))
  hidden_states = jnp.pad(hidden_states, ((0, pad), (0, 0)))
  hidden_states_scale = jnp.pad(hidden_states_scale, ((0, 0), (0, pad)))
  token_valid = jnp.arange(padded) < num_tokens

  tokens = PartitionSpec(st.token_axes)
  by_expert = PartitionSpec(st.expert_axis)
  replicated = PartitionSpec()
  in_specs = (tokens, replicated, tokens, PartitionSpec(None, st.token_axes), tokens, by_expert, replicated)
  operands = (routing_logits, routing_bias, hidden_states, hidden_states_scale, token_valid, experts,
              routed_scaling_factor)
  # A spec applies to every leaf of its operand (the experts' values and scales alike).
  operands = [jax.tree.map(lambda x, spec=spec: _place(x, mesh, spec), operand)
              for operand, spec in zip(operands, in_specs)]
  # check_vma=False: the single-rank code (reference loops, Pallas calls) builds loop carries and cond
  # branches from fresh constants, which the varying-manual-axes checker types as unvarying. The out_specs
  # are right by construction: outputs are per-token rows, stats are pmax-reduced over every token axis.
  program = jax.shard_map(functools.partial(_shard_program, st=st), mesh=mesh, in_specs=in_specs,
                          out_specs=(tokens, DispatchStats(replicated, replicated, replicated)), check_vma=False)
  out, stats = program(*operands)
  explicit = any(t == jax.sharding.AxisType.Explicit for a, t in zip(mesh.axis_names, mesh.axis_types)
                 if a in st.token_axes)
  if pad and explicit:
    # Explicit sharding has no uneven layouts: T rows over the token shards can only be replicated.
    out = jax.sharding.reshard(out, jax.sharding.NamedSharding(mesh, replicated))
  return out[:num_tokens], stats


def _place(x, mesh, spec):
  """Lays `x` out as shard_map's `spec` expects: `reshard` on Explicit mesh axes, a constraint on Auto ones."""
  sharding = jax.sharding.NamedSharding(mesh, spec)
  explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == jax.sharding.AxisType.Explicit}
  used = {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}
  if (used and used <= explicit) or (not used and explicit):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)
