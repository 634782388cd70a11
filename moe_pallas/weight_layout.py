"""The expert weights' two memory orders: SPEC.md's [E, N, K], and block-major [E, N/128, K/128, 128, 128].

Block-major keeps the values and their 128 x 128 scale blocks and only reorders the bytes: each block (the
16 KB that one weight scale covers) is contiguous, blocks of one expert in (N-block, K-block) order. The
GEMMs read a weight tile a K step, 128 bytes of each of 64-256 rows at the row stride (7168 bytes for W13);
block-major turns that into one or two contiguous 16 KB reads. Measured on the H200 with the Triton GEMM1
launch the tile table picks (experiments/stream_probe.py --set=block_major; PERF 64): 7-11 % faster at 8,
14 and 20 experts; in the layer, GEMM1 4-9 % and GEMM2 1-5 % at T=1-901. A model reorders its weights
once, when it loads them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_pallas.config import SCALE_BLOCK


def to_block_major(w: jax.Array) -> jax.Array:
  """[E, N, K] -> [E, N/128, K/128, 128, 128] (the same values; N and K multiples of 128)."""
  if w.ndim != 3 or w.shape[1] % SCALE_BLOCK or w.shape[2] % SCALE_BLOCK:
    raise ValueError(f"to_block_major takes [E, N, K] weights with N and K multiples of {SCALE_BLOCK}, got "
                     f"shape {list(w.shape)}")
  e, n, k = w.shape
  return jnp.transpose(w.reshape(e, n // SCALE_BLOCK, SCALE_BLOCK, k // SCALE_BLOCK, SCALE_BLOCK), (0, 1, 3, 2, 4))


def from_block_major(w: jax.Array) -> jax.Array:
  """The inverse of `to_block_major`: [E, N/128, K/128, 128, 128] -> [E, N, K]."""
  if not is_block_major(w):
    raise ValueError(f"from_block_major takes [E, N/{SCALE_BLOCK}, K/{SCALE_BLOCK}, {SCALE_BLOCK}, {SCALE_BLOCK}] "
                     f"weights, got shape {list(w.shape)}")
  e, nb, kb, _, _ = w.shape
  return jnp.transpose(w, (0, 1, 3, 2, 4)).reshape(e, nb * SCALE_BLOCK, kb * SCALE_BLOCK)


def experts_in_layout(weights, layout: str) -> tuple:
  """(gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale) with both weights in `layout`:
  "spec" ([E, N, K], as given) or "block_major" (`to_block_major` of [E, N, K] weights); scales as given."""
  w1, s1, w2, s2 = weights
  if layout == "spec":
    return w1, s1, w2, s2
  if layout == "block_major":
    return to_block_major(w1), s1, to_block_major(w2), s2
  raise ValueError(f"layout must be 'spec' or 'block_major', got {layout!r}")


def is_block_major_shape(shape) -> bool:
  """Whether an array of `shape` is block-major expert weights ([E, N/128, K/128, 128, 128])."""
  shape = tuple(shape)
  return len(shape) == 5 and shape[3:] == (SCALE_BLOCK, SCALE_BLOCK)


def spec_shape(shape) -> tuple[int, ...]:
  """The [E, N, K] shape of expert weights of `shape` in either order (any other shape as it is)."""
  shape = tuple(shape)
  if is_block_major_shape(shape):
    e, nb, kb, _, _ = shape
    return e, nb * SCALE_BLOCK, kb * SCALE_BLOCK
  return shape


def is_block_major(w) -> bool:
  """Whether `w`'s shape is block-major ([E, N/128, K/128, 128, 128])."""
  return is_block_major_shape(w.shape)


def logical_shape(w) -> tuple[int, ...]:
  """(E, N, K) of weights in either order."""
  return spec_shape(w.shape)
