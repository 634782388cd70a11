"""Tile schedule of the grouped GEMMs: which local expert each M-tile of rows belongs to.

In the manner of megablox's `make_group_metadata`, derived from the RoutingPlan in pure jnp:

1. Each local expert's rows are padded to a multiple of `block_m`, so every M-tile holds one expert:
   `padded_sizes[e] = round_up(group_sizes[e], block_m)`, `padded_offsets` its exclusive prefix sum.
2. Tile `i` (rows `i*block_m .. (i+1)*block_m` of the padded row space) belongs to the expert whose padded
   range holds it; tiles past `padded_offsets[-1]` belong to no expert and get `num_local_experts`.
3. Padded row `p` of expert `e` maps to sorted plan row `p - padded_offsets[e] + group_offsets[e]` when
   that is inside the expert's group, else to no row (a padding row, whose results are never read).

Invariant: an expert with no rows has no tile, so the kernels never read its weights. Capacity (static):
every expert adds at most one partially filled tile and there are at most min(E_local, R) non-empty
experts, so `cdiv(R, block_m) + min(E_local, R)` tiles always suffice.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_pallas.routing import RoutingPlan


class TileSchedule(NamedTuple):
  tile_expert: jax.Array     # [num_tiles] int32: local expert of each M-tile; E_local for unused tiles
  row_token: jax.Array       # [num_tiles * block_m] int32: token each padded row reads (0 for padding)
  row_weight: jax.Array      # [num_tiles * block_m] float32: routing weight of each padded row (0 for padding)
  pair_padded_row: jax.Array  # [T, top_k] int32: padded row holding pick (t, j); num_rows if not local
  num_used_tiles: jax.Array  # [] int32: tiles that belong to an expert
  # int32 zeros for a GEMM that counts arrivals in its kernel (`GemmTiling.fixup_in_kernel`), written by the
  # routing kernels where they run (no memset kernel a call); None: the GEMM zeroes its own.
  arrival_counters: jax.Array | None = None

  @property
  def num_tiles(self) -> int:
    return self.tile_expert.shape[0]

  @property
  def num_rows(self) -> int:
    return self.row_token.shape[0]


def max_tiles(capacity: int, num_local_experts: int, block_m: int) -> int:
  return -(-capacity // block_m) + min(num_local_experts, capacity)


def make_tile_schedule(plan: RoutingPlan, *, block_m: int) -> TileSchedule:
  """Pads each expert's group to whole `block_m` tiles and maps tiles and rows back to the plan."""
  num_local = plan.num_local_experts
  capacity = plan.capacity
  num_tiles = max_tiles(capacity, num_local, block_m)
  num_rows = num_tiles * block_m

  padded_sizes = (plan.group_sizes + block_m - 1) // block_m * block_m
  padded_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(padded_sizes, dtype=jnp.int32)])
  num_used_tiles = padded_offsets[-1] // block_m

  tile_starts = jnp.arange(num_tiles, dtype=jnp.int32) * block_m
  # Tile i belongs to the first expert whose padded range ends after its start: count the experts
  # that end at or before it (empty experts end where they start, so they are skipped). Tiles past
  # the last range count all E_local experts, which is the "no expert" marker. One fused compare-sum
  # (not a searchsorted loop, which costs a chain of tiny kernels at small T).
  tile_expert = jnp.sum(padded_offsets[None, 1:] <= tile_starts[:, None], axis=1, dtype=jnp.int32)

  rows = jnp.arange(num_rows, dtype=jnp.int32)
  row_expert = jnp.repeat(tile_expert, block_m, total_repeat_length=num_rows)
  row_expert_safe = jnp.minimum(row_expert, num_local - 1)
  within = rows - padded_offsets[row_expert_safe]
  is_real = (row_expert < num_local) & (within < plan.group_sizes[row_expert_safe])
  plan_row = jnp.where(is_real, plan.group_offsets[row_expert_safe] + within, 0)
  row_token = jnp.where(is_real, plan.token_ids[plan_row], 0)
  row_weight = jnp.where(is_real, plan.weights[plan_row], 0.0)

  # Sorted row r of expert e sits at padded row r - group_offsets[e] + padded_offsets[e].
  pair_expert = jnp.minimum(plan.expert_ids[jnp.minimum(plan.pair_rows, capacity - 1)], num_local - 1)
  pair_padded_row = plan.pair_rows - plan.group_offsets[pair_expert] + padded_offsets[pair_expert]
  pair_padded_row = jnp.where(plan.pair_rows < capacity, pair_padded_row, num_rows)
  return TileSchedule(tile_expert=tile_expert, row_token=row_token, row_weight=row_weight,
                      pair_padded_row=pair_padded_row.astype(jnp.int32), num_used_tiles=num_used_tiles)


# ---- how persistent kernels visit the schedule ---------------------------------------------------------

_DEFAULT_NUM_SMS = 132   # the H100/H200 SM count, where the device does not say (lowering on a CPU host)
_INTERPRET_NUM_SMS = 3   # interpret mode: few programs, so that each loops over several work items


def num_sms(interpret=False) -> int:
  """SMs of the device a persistent kernel is traced for (its grid: a multiple of this); in interpret mode
  3, so that every program loops over several work items at test shapes."""
  if interpret:
    return _INTERPRET_NUM_SMS
  return getattr(jax.devices()[0], "core_count", None) or _DEFAULT_NUM_SMS


def used_tiles_operand(used_tiles, num_tiles: int) -> jax.Array:
  """[1] int32 count of the leading tiles in use (`TileSchedule.num_used_tiles`; all of them when the
  caller gives none), as a persistent kernel takes it."""
  if used_tiles is None:
    return jnp.full((1,), num_tiles, jnp.int32)
  used_tiles = jnp.asarray(used_tiles)
  if used_tiles.shape not in ((), (1,)) or not jnp.issubdtype(used_tiles.dtype, jnp.integer):
    raise ValueError(f"used_tiles must be one integer (the number of leading tiles in use), got "
                     f"{used_tiles.dtype} of shape {used_tiles.shape}")
  return jnp.reshape(used_tiles.astype(jnp.int32), (1,))


def grouped_coordinates(index, num_m_tiles, num_n_tiles: int, group_m: int):
  """(M-tile, N-tile) of work item `index` of num_m_tiles (static, or a device-side count of used tiles) x
  num_n_tiles in grouped order: group_m M-tiles share each N sweep, so that a group's weight tiles and rows
  stay in L2 (Triton's grouped ordering; the last group takes the M-tiles left)."""
  items_per_group = group_m * num_n_tiles
  first_m = index // items_per_group * group_m
  group_size = jnp.minimum(num_m_tiles - first_m, group_m)
  within = index % items_per_group
  return first_m + within % group_size, within // group_size
