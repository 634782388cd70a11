"""FP8 block-scaled tensors: one pytree of values + scales, and blockwise (de)quantization.

Scales are dequantization multipliers (value = fp8 * scale), as in DeepSeek-V3 checkpoints
(`weight_scale_inv`) and SPEC.md.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_pallas import weight_layout

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# DeepGEMM clamps a block's amax at 1e-4 so an all-zero block gets a finite, tiny scale instead of 0/0.
AMAX_FLOOR = 1e-4


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockScaledArray:
  """FP8 values with one float32 scale per `block_shape` tile of the last two axes.

  Attributes:
    values: float8_e4m3fn [..., M, K].
    scales: float32 [..., M / bm, K / bk].
    block_shape: (bm, bk), e.g. (128, 128) for weights, (1, 128) for activations.
  """

  values: jax.Array
  scales: jax.Array
  block_shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self):
    return self.values.shape

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return dequantize(self, dtype)


class LocalExperts(NamedTuple):
  """The expert weights of one rank, as they travel inside the library (SPEC.md inputs 5-8, bundled).

  Attributes:
    gemm1: W13, values [E_local, 2I, H] float8_e4m3fn, scales [E_local, 2I/B, H/B] float32, (B, B) blocks.
    gemm2: W2, values [E_local, H, I] float8_e4m3fn, scales [E_local, H/B, I/B] float32, (B, B) blocks.
    Either `values` may instead be block-major, [E_local, N/B, K/B, B, B] (`moe_pallas.weight_layout`, B =
    128): the kernels read it as it is, the xla path through `in_spec_order`.
  """

  gemm1: BlockScaledArray
  gemm2: BlockScaledArray

  @classmethod
  def from_arrays(cls, gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale) -> "LocalExperts":
    """Bundles the public signature's four arrays; B comes from the shapes (H / (H/B))."""
    block = weight_layout.logical_shape(gemm1_weights)[2] // gemm1_weights_scale.shape[2]
    return cls(BlockScaledArray(gemm1_weights, gemm1_weights_scale, (block, block)),
               BlockScaledArray(gemm2_weights, gemm2_weights_scale, (block, block)))

  def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The public order: gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale."""
    return self.gemm1.values, self.gemm1.scales, self.gemm2.values, self.gemm2.scales

  def in_spec_order(self) -> "LocalExperts":
    """These experts with any block-major values reordered to SPEC.md's [E_local, N, K] (a copy)."""
    spec = lambda a: (dataclasses.replace(a, values=weight_layout.from_block_major(a.values))
                      if weight_layout.is_block_major(a.values) else a)
    return LocalExperts(spec(self.gemm1), spec(self.gemm2))

  @property
  def num_experts(self) -> int:
    return self.gemm1.values.shape[0]

  def select(self, experts) -> "LocalExperts":
    """The experts `experts` (an index, slice or index array along the expert axis), blocks unchanged."""
    return jax.tree.map(lambda x: x[experts], self)


def _check_blocks(shape, block_shape, what):
  if len(shape) < 2:
    raise ValueError(f"{what} must have rank >= 2, got shape {tuple(shape)}")
  bm, bk = block_shape
  if shape[-2] % bm or shape[-1] % bk:
    raise ValueError(f"{what} shape {tuple(shape)} is not a multiple of block_shape {tuple(block_shape)} "
                     "in its last two axes")


def quantize_blockwise(x: jax.Array, block_shape: tuple[int, int] = (1, 128)) -> BlockScaledArray:
  """Quantizes `x` [..., M, K] to FP8 e4m3 with one scale per (bm, bk) tile: scale = amax / 448."""
  block_shape = tuple(int(b) for b in block_shape)
  _check_blocks(x.shape, block_shape, "x")
  bm, bk = block_shape
  *lead, m, k = x.shape
  tiles = x.astype(jnp.float32).reshape(*lead, m // bm, bm, k // bk, bk)
  amax = jnp.max(jnp.abs(tiles), axis=(-3, -1))
  scales = jnp.maximum(amax, AMAX_FLOOR) / FP8_MAX
  # Clip before the cast: amax / (amax / 448) can round a hair above 448, and e4m3fn has no inf, so
  # the cast would give NaN.
  scaled = jnp.clip(tiles / scales[..., :, None, :, None], -FP8_MAX, FP8_MAX)
  values = scaled.reshape(x.shape).astype(FP8_DTYPE)
  return BlockScaledArray(values, scales, block_shape)


def expand_scales(scales: jax.Array, block_shape: tuple[int, int]) -> jax.Array:
  """Repeats each tile's scale over its (bm, bk) elements: [..., M/bm, K/bk] -> [..., M, K]."""
  bm, bk = block_shape
  return jnp.repeat(jnp.repeat(scales, bm, axis=-2), bk, axis=-1)


def dequantize(a: BlockScaledArray, dtype=jnp.float32) -> jax.Array:
  """values * scales, broadcast per tile, computed in float32 and returned as `dtype`. Block-major expert
  values ([E, N/B, K/B, B, B] with [E, N/B, K/B] scales, `moe_pallas.weight_layout`) come back as [E, N, K]."""
  values = a.values
  if weight_layout.is_block_major(values) and a.scales.ndim == 3:
    values = weight_layout.from_block_major(values)
  _check_blocks(values.shape, a.block_shape, "values")
  full = values.astype(jnp.float32) * expand_scales(a.scales.astype(jnp.float32), a.block_shape)
  return full.astype(dtype)


def activation_scale_to_public(scale: jax.Array) -> jax.Array:
  """[T, H/B] (row-major, as `quantize_blockwise` gives) -> the public transposed layout [H/B, T]."""
  return jnp.swapaxes(scale, -1, -2)


def activation_scale_from_public(scale: jax.Array) -> jax.Array:
  """The public layout [H/B, T] (`scale[b, t]`) -> [T, H/B]."""
  return jnp.swapaxes(scale, -1, -2)
