"""SwiGLU and its per-row FP8 quant as the kernels' epilogues compute them (Pallas-Triton and Mosaic GPU alike).

One definition, so that the Triton GEMM1 (fused or after split-K partials) and the Mosaic GEMM1's epilogues
give the same bits, and those of `quant.quantize_blockwise` (amax / 448, the amax floored).
"""

from __future__ import annotations

from jax import lax
import jax.numpy as jnp

from moe_pallas.quant import AMAX_FLOOR, FP8_MAX


def silu(x):
  # x / (1 + exp(-x)): exp overflows to inf for very negative x, giving -0, never inf * 0 = NaN.
  return x / (1.0 + jnp.exp(-x))


def quantized_rows(swiglu, amax):
  """FP8-range values of a [rows, cols] SwiGLU tile and its rows' scales, given each row's amax.

  Returns:
    (values clipped to +-448, still float32: the caller casts as it stores; scales [rows] float32).
  """
  scale = jnp.maximum(amax, AMAX_FLOOR) / FP8_MAX
  clipped = jnp.clip(swiglu / lax.broadcast_in_dim(scale, swiglu.shape, [0]), -FP8_MAX, FP8_MAX)
  # Compiled, min/max return the non-NaN operand (interpret mode keeps the NaN): without this a NaN
  # product (a NaN activation scale) would be clipped to +-448 and come out finite (issue 9).
  return jnp.where(swiglu != swiglu, swiglu, clipped), scale
