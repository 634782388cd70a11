"""Expert parallelism: the full E-expert layer with its experts sharded over an `'expert'` mesh axis.

`moe_layer_sharded` runs SPEC.md's function over all E global experts on a device mesh with `jax.shard_map`
and XLA collectives (NCCL on GPUs). Tokens are split over the expert axis (and over an optional data axis);
expert `e` lives on expert-axis index `e // E_local`, E_local = E / (expert axis size). Each shard routes its
own tokens over all E experts, the tokens travel to the shards that own their picks, each shard runs its
E_local experts with `local_expert_offset = axis_index * E_local` (`plan_local` + `apply_local_experts`,
the single-rank layer's pieces), the float32 partial outputs travel back and are added in float32, and the
sum is rounded to bfloat16 once (SPEC.md step 7).

Strategies (`strategy=`), all exact:

- `"all_gather"`: all-gather every shard's tokens, compute the local experts for all of them, `psum_scatter`
  the float32 partials back. The baseline.
- `"all_to_all"`: send each token only to the shards that own at least one of its picks, with
  `lax.all_to_all` into fixed buckets of `capacity` tokens per (source, destination) pair, and send the
  results back the same way. A token goes to a destination once, however many of its picks live there.
  Overflow never drops a token: when any bucket on any shard would exceed `capacity`, every shard (the
  predicate is reduced over the mesh, so all agree) runs the all-gather strategy for this call instead,
  under a `lax.cond`; `return_stats=True` reports it.
- `"ragged_all_to_all"`: the same dispatch with `lax.ragged_all_to_all`, which sends no padding; its buffers
  are sized for the worst case, so it cannot overflow. XLA:CPU does not implement the collective
  ("UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is not supported by XLA:CPU", jax 0.11.2), so this
  strategy is for GPUs; on CPU meshes it raises NotImplementedError naming the alternative.

Bytes on the wire per token (from the code below; H hidden, B = 128, k = top_k, P expert-axis size):
one token row is `row_bytes = H + 4 H/B + 8 k` (fp8 activations, float32 block scales, int32 expert ids,
float32 weights; 7456 B for DeepSeek-V3) and one result row is `4 H` (float32 partial, 28672 B). Results
travel in float32 because SPEC.md rounds the sum, not the partials.

- all_gather: `(P - 1) * (row_bytes + 4 H)` per token (each row reaches every peer; the reduce-scatter
  moves `(P - 1) / P` of the `[P T_local, H]` float32 partials per shard). DeepSeek-V3, P = 8: 252,896 B.
- all_to_all: `(P - 1) * (C / T_local) * (row_bytes + 4 H)`, padding included, with the capacity C below.
  DeepSeek-V3, P = 8 (a token reaches at most 4 shards), capacity_factor 1.25: C = 0.625 T_local, 158,060 B.
- ragged_all_to_all: `(remote destinations of the token) * (row_bytes + 4 H)`, no padding: at most
  `min(P - 1, D) * 36,128` B for DeepSeek-V3 (D below; 144,512 B at P = 8), and 126,448 B on average for
  tokens that reach 4 shards of 8 when 7/8 of the shards are remote.

Capacity of the all_to_all buckets: a token reaches at most D = min(P, top_k, the shards spanned by the
topk_group widest groups) destinations, so a bucket holds T_local * D / P tokens on average at most, and
C = min(T_local, ceil(capacity_factor * T_local * D / P)). C = T_local cannot overflow (one bucket holds
every token) and is what small T_local and P <= 2 get; with it, all_to_all moves as many bytes as
all_gather, so the byte savings start at P > 2 (at P = 2 the ragged strategy saves only the tokens whose
picks all stay home). An overflowing call costs what all_gather costs.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moe_pallas import validation
from moe_pallas.config import MoEConfig
from moe_pallas.layer import apply_local_experts, resolve_implementation
from moe_pallas.routing import plan_local, route

STRATEGIES = ("all_gather", "all_to_all", "ragged_all_to_all")
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


def ragged_all_to_all_by_all_gather(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                    axis_name):
  """`lax.ragged_all_to_all`'s documented semantics built from `all_gather`, for CPU tests of the bookkeeping.

  Moves every shard's whole operand to every shard, so it is for testing only.
  """
  del recv_sizes  # implied by the senders' send_sizes
  me = jax.lax.axis_index(axis_name)
  operands = jax.lax.all_gather(operand, axis_name)             # [P, N, ...]
  starts = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # [P]: where source i's rows for me start
  sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
  targets = jax.lax.all_gather(output_offsets, axis_name)[:, me]
  num_rows, num_out = operand.shape[0], output.shape[0]
  step = jnp.arange(num_rows, dtype=jnp.int32)[None, :]
  rows = jnp.clip(starts[:, None] + step, 0, num_rows - 1)
  dest = jnp.where(step < sizes[:, None], targets[:, None] + step, num_out)
  picked = jnp.take_along_axis(operands, rows.reshape(rows.shape + (1,) * (operand.ndim - 1)), axis=1)
  return output.at[dest.reshape(-1)].set(picked.reshape((-1,) + operand.shape[1:]), mode="drop")


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


# ---- per-shard program -------------------------------------------------------------------------------------

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


class _Static(NamedTuple):
  """Everything the per-shard program needs that is not an array (hashable, for jit)."""

  config: MoEConfig          # num_local_experts = E / P
  num_shards: int            # P
  strategy: str
  capacity: int              # all_to_all bucket size C
  expert_axis: str
  token_axes: tuple          # mesh axes the tokens are split over (data axis first)
  implementation: str
  interpret: bool
  intermediate_dtype: jnp.dtype
  ragged_collective: Callable


def _shard_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, token_valid, gemm1_weights,
                   gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, routed_scaling_factor, *, st: _Static):
  """One shard: T_local tokens in, their bf16 output rows [T_local, H] and the dispatch stats out."""
  config, num_shards = st.config, st.num_shards
  num_tokens, hidden = hidden_states.shape
  num_local = config.num_local_experts
  fmt = _RowFormat(hidden, hidden_states_scale.shape[0], config.top_k)
  me = jax.lax.axis_index(st.expert_axis)

  topk_ids, topk_weights = route(routing_logits, routing_bias, config=config,
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
    plan = plan_local(ids, weights, local_expert_offset=me * num_local, num_local_experts=num_local)
    return apply_local_experts(act, scales.T, gemm1_weights, gemm1_weights_scale, gemm2_weights,
                               gemm2_weights_scale, plan, out_dtype=jnp.float32, implementation=st.implementation,
                               interpret=st.interpret, intermediate_dtype=st.intermediate_dtype)

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
    received = st.ragged_collective(
        rows_ext[token_in_row], jnp.broadcast_to(empty_row, (recv_rows, fmt.num_bytes)), layout.input_offsets,
        layout.send_sizes, layout.output_offsets, layout.recv_sizes, axis_name=st.expert_axis)
    returned = st.ragged_collective(
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
  capacity = st.capacity if st.strategy == "all_to_all" else num_tokens
  stats = DispatchStats(fell_back=fell_back, max_bucket_tokens=max_bucket,
                        capacity=jnp.asarray(capacity, jnp.int32))
  return out.astype(jnp.bfloat16), stats


@functools.partial(jax.jit, static_argnames=("mesh", "st"))
def _sharded_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                     gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, routed_scaling_factor, *, mesh, st):
  routed_scaling_factor = jnp.asarray(routed_scaling_factor, jnp.float32)  # inside: no extra program per call
  num_tokens = routing_logits.shape[0]
  num_token_shards = math.prod(mesh.shape[a] for a in st.token_axes)
  padded = -(-num_tokens // num_token_shards) * num_token_shards
  pad = padded - num_tokens
  routing_logits = jnp.pad(routing_logits, ((0, pad), (0, 0)))
  hidden_states = jnp.pad(hidden_states, ((0, pad), (0, 0)))
  hidden_states_scale = jnp.pad(hidden_states_scale, ((0, 0), (0, pad)))
  token_valid = jnp.arange(padded) < num_tokens

  tokens = PartitionSpec(st.token_axes)
  experts = PartitionSpec(st.expert_axis)
  replicated = PartitionSpec()
  in_specs = (tokens, replicated, tokens, PartitionSpec(None, st.token_axes), tokens, experts, experts, experts,
              experts, replicated)
  operands = (routing_logits, routing_bias, hidden_states, hidden_states_scale, token_valid, gemm1_weights,
              gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, routed_scaling_factor)
  operands = [_place(x, mesh, spec) for x, spec in zip(operands, in_specs)]
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


def _validate_all_expert_inputs(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                                gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, routed_scaling_factor,
                                config, intermediate_dtype) -> MoEConfig:
  """moe_layer's checks for a layer that holds all E experts (offset 0, E_local = E); returns the geometry."""
  if config is not None and isinstance(config, MoEConfig):
    config = config.with_local_experts(gemm1_weights.shape[0])
  config = validation.validate_layer_inputs(
      routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
      gemm2_weights, gemm2_weights_scale, local_expert_offset=0, routed_scaling_factor=routed_scaling_factor,
      config=config)
  validation.validate_intermediate_dtype(intermediate_dtype)
  return config


def moe_layer_sharded(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                      gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, mesh: jax.sharding.Mesh,
                      routed_scaling_factor, config: MoEConfig | None = None, strategy: str = "all_to_all",
                      capacity: int | None = None, capacity_factor: float | None = None,
                      expert_axis: str = "expert", data_axis: str | None = None,
                      implementation: str | None = None, interpret: bool = False,
                      intermediate_dtype=jnp.float8_e4m3fn, return_stats: bool = False):
  """The DeepSeek-V3 FP8 block-scale MoE layer over all E experts, expert-parallel on `mesh`.

  Computes SPEC.md's function for every global expert (as if local_expert_offset = 0 and E_local = E): the
  float32 sum of the P single-rank partial outputs, rounded to bfloat16 once. Works inside `jax.jit`.

  Args:
    routing_logits: [T, E] float32.
    routing_bias: [E] bfloat16 or float32; used for expert selection only.
    hidden_states: [T, H] float8_e4m3fn.
    hidden_states_scale: [H/128, T] float32 (transposed, as in SPEC.md).
    gemm1_weights: [E, 2I, H] float8_e4m3fn, all global experts; split over `expert_axis` (place it with
      `NamedSharding(mesh, PartitionSpec(expert_axis))` to avoid a reshard per call).
    gemm1_weights_scale: [E, 2I/128, H/128] float32.
    gemm2_weights: [E, H, I] float8_e4m3fn; gemm2_weights_scale: [E, H/128, I/128] float32.
    mesh: a `jax.sharding.Mesh` (e.g. `jax.make_mesh((8,), ("expert",))`) with `expert_axis`, whose size P
      must divide E; shard p holds experts p*E/P .. (p+1)*E/P - 1.
    routed_scaling_factor: float multiplying the normalized routing weights (2.5 in DeepSeek-V3).
    config: routing constants (top_k, n_group, topk_group); DeepSeek-V3's by default when E = 256. Its sizes
      must match the shapes; its num_local_experts is ignored (the mesh sets E_local = E / P).
    strategy: "all_gather", "all_to_all" (default) or "ragged_all_to_all" (GPUs only); see the module doc.
    capacity: all_to_all only: tokens per (source, destination) bucket, overriding `capacity_factor`.
    capacity_factor: all_to_all only (default 1.25): C = min(T_local, ceil(factor * T_local * D / P)).
      Overflow never drops tokens: the call falls back to the all-gather strategy (exact) instead.
    expert_axis: the mesh axis the experts are split over.
    data_axis: optional second mesh axis; tokens are split over (data_axis, expert_axis) and each data index
      is an independent expert-parallel group (weights replicated over data_axis). None: tokens are split
      over expert_axis only. T need not divide: the tokens are padded and the padding routes nowhere.
    implementation: "xla", "triton" or None (best available), as in `moe_layer`.
    interpret: run the Pallas kernels in interpret mode (CPU).
    intermediate_dtype: float8_e4m3fn or bfloat16 SwiGLU output on the kernel path, as in `moe_layer`.
    return_stats: also return a `DispatchStats` (whether the all_to_all call fell back, bucket fill).

  Returns:
    [T, H] bfloat16, sharded over the token axes (replicated on Explicit-axis meshes when T is not a
    multiple of the token shard count); with `return_stats`, `(out, DispatchStats)`.

  Raises:
    ValueError / TypeError for bad shapes, dtypes, mesh axes, a P that does not divide E, or capacity
    arguments given to a strategy that has no buckets. NotImplementedError for "ragged_all_to_all" on a
    CPU mesh.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('expert',))), "
                    f"got {type(mesh).__name__}")
  if expert_axis not in mesh.axis_names:
    raise ValueError(f"expert_axis={expert_axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}")
  if data_axis is not None and (data_axis not in mesh.axis_names or data_axis == expert_axis):
    raise ValueError(f"data_axis={data_axis!r} must be None or a mesh axis other than expert_axis="
                     f"{expert_axis!r}; the mesh's axes are {mesh.axis_names}")
  axis_types = dict(zip(mesh.axis_names, mesh.axis_types))
  if data_axis is not None and axis_types[data_axis] != axis_types[expert_axis]:
    raise ValueError(f"data_axis={data_axis!r} and expert_axis={expert_axis!r} must have the same AxisType, got "
                     f"{axis_types[data_axis]} and {axis_types[expert_axis]}")
  if strategy != "all_to_all" and (capacity is not None or capacity_factor is not None):
    raise ValueError(f"capacity and capacity_factor size the all_to_all buckets; strategy={strategy!r} has none "
                     f"(got capacity={capacity}, capacity_factor={capacity_factor})")
  if strategy == "ragged_all_to_all" and mesh.devices.flat[0].platform == "cpu":
    raise NotImplementedError(
        "strategy='ragged_all_to_all' needs GPUs: XLA:CPU does not implement the ragged-all-to-all collective. "
        "Use strategy='all_to_all' (the same dispatch with fixed per-destination buckets) or 'all_gather'.")

  num_experts = routing_logits.shape[-1] if len(getattr(routing_logits, "shape", ())) == 2 else None
  if gemm1_weights.ndim != 3 or num_experts is None or gemm1_weights.shape[0] != num_experts:
    raise ValueError(f"gemm1_weights must hold all E global experts, [E, 2I, H] with E = routing_logits.shape[1]; "
                     f"got gemm1_weights {list(gemm1_weights.shape)} and routing_logits "
                     f"{list(getattr(routing_logits, 'shape', ()))}")
  num_shards = mesh.shape[expert_axis]
  if num_experts % num_shards:
    raise ValueError(f"the expert axis size {num_shards} (mesh axis {expert_axis!r}) must divide E={num_experts}")
  config = _validate_all_expert_inputs(
      routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
      gemm2_weights, gemm2_weights_scale, routed_scaling_factor=routed_scaling_factor, config=config,
      intermediate_dtype=intermediate_dtype)
  # Checked here; passed on as given, so that None keeps apply_local_experts' fall-back to xla.
  resolve_implementation(implementation, interpret=interpret)
  shard_config = config.with_local_experts(num_experts // num_shards)

  token_axes = (expert_axis,) if data_axis is None else (data_axis, expert_axis)
  num_tokens = routing_logits.shape[0]
  tokens_per_shard = -(-num_tokens // math.prod(mesh.shape[a] for a in token_axes))
  if capacity is not None:
    if not isinstance(capacity, int) or capacity <= 0:
      raise ValueError(f"capacity must be a positive int (tokens per bucket), got {capacity!r}")
    capacity = min(capacity, max(tokens_per_shard, 1))
  else:
    factor = DEFAULT_CAPACITY_FACTOR if capacity_factor is None else float(capacity_factor)
    if not factor > 0:
      raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    capacity = bucket_capacity(shard_config, num_shards=num_shards, tokens_per_shard=max(tokens_per_shard, 1),
                               capacity_factor=factor)

  if num_tokens == 0:
    out = jnp.zeros((0, config.hidden), jnp.bfloat16)
    stats = DispatchStats(jnp.zeros((), jnp.bool_), jnp.zeros((), jnp.int32), jnp.asarray(capacity, jnp.int32))
    return (out, stats) if return_stats else out

  st = _Static(config=shard_config, num_shards=num_shards, strategy=strategy, capacity=capacity,
               expert_axis=expert_axis, token_axes=token_axes, implementation=implementation, interpret=interpret,
               intermediate_dtype=jnp.dtype(intermediate_dtype), ragged_collective=jax.lax.ragged_all_to_all)
  out, stats = _sharded_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                                gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, routed_scaling_factor,
                                mesh=mesh, st=st)
  return (out, stats) if return_stats else out


def moe_layer_all_experts(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                          gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, routed_scaling_factor,
                          config: MoEConfig | None = None, experts_per_call: int | None = None,
                          implementation: str | None = None, interpret: bool = False,
                          intermediate_dtype=jnp.float8_e4m3fn):
  """The single-device computation `moe_layer_sharded` must equal: all E experts on one device.

  The float32 sum of the E / experts_per_call single-rank partials (`apply_local_experts` with offsets
  0, experts_per_call, ...), rounded to bfloat16 once. Arguments as in `moe_layer_sharded`; `experts_per_call`
  (default E) must divide E. Meant for arrays on one device: weights sharded over an Explicit mesh axis
  cannot be sliced into chunks here (pass the unsharded arrays).

  Returns:
    [T, H] bfloat16.
  """
  num_experts = gemm1_weights.shape[0]
  experts_per_call = num_experts if experts_per_call is None else experts_per_call
  if num_experts % experts_per_call:
    raise ValueError(f"experts_per_call={experts_per_call} must divide E={num_experts}")
  config = _validate_all_expert_inputs(
      routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
      gemm2_weights, gemm2_weights_scale, routed_scaling_factor=routed_scaling_factor, config=config,
      intermediate_dtype=intermediate_dtype)
  resolve_implementation(implementation, interpret=interpret)  # checked; None passed on (xla fall-back)
  return _all_experts_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                              gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, routed_scaling_factor,
                              config=config.with_local_experts(experts_per_call), implementation=implementation,
                              interpret=interpret, intermediate_dtype=jnp.dtype(intermediate_dtype))


@functools.partial(jax.jit, static_argnames=("config", "implementation", "interpret", "intermediate_dtype"))
def _all_experts_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                         gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, routed_scaling_factor, *,
                         config, implementation, interpret, intermediate_dtype):
  topk_ids, topk_weights = route(routing_logits, routing_bias, config=config,
                                 routed_scaling_factor=routed_scaling_factor)
  num_local = config.num_local_experts
  out = jnp.zeros(hidden_states.shape, jnp.float32)
  for first in range(0, config.num_experts, num_local):
    chunk = slice(first, first + num_local)
    plan = plan_local(topk_ids, topk_weights, local_expert_offset=first, num_local_experts=num_local)
    out = out + apply_local_experts(hidden_states, hidden_states_scale, gemm1_weights[chunk],
                                    gemm1_weights_scale[chunk], gemm2_weights[chunk], gemm2_weights_scale[chunk],
                                    plan, out_dtype=jnp.float32, implementation=implementation, interpret=interpret,
                                    intermediate_dtype=intermediate_dtype)
  return out.astype(jnp.bfloat16)
