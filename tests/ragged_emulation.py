"""A stand-in for `lax.ragged_all_to_all` on CPU meshes (XLA:CPU lacks the collective), for tests only.

`emulated_ragged_all_to_all()` substitutes it for the collective the sharded program calls
(`moe_pallas.sharding.program.ragged_all_to_all`, looked up while tracing), so `moe_layer_sharded(strategy=
"ragged_all_to_all")` runs its whole bookkeeping on CPU. The jit's static key does not see the substitution,
so the program's cache is cleared on entry and exit: no trace made with one collective serves the other.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from moe_pallas.sharding import program


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


@contextlib.contextmanager
def emulated_ragged_all_to_all():
  """Within the block, the sharded layer's ragged strategy runs on `ragged_all_to_all_by_all_gather`."""
  real = program.ragged_all_to_all
  program.sharded_program.clear_cache()
  program.ragged_all_to_all = ragged_all_to_all_by_all_gather
  try:
    yield
  finally:
    program.ragged_all_to_all = real
    program.sharded_program.clear_cache()
