"""Which way the tests run the Pallas kernels on this machine (compiled on a GPU, interpreted elsewhere)."""

from __future__ import annotations

import jax

from moe_pallas import validation


def kernels_compile_here() -> bool:
  """True when the default device runs the "triton" kernels compiled: an NVIDIA GPU of compute capability
  >= 8.9 (FP8 matrix instructions), the same rule `moe_layer(implementation=None)` follows."""
  return jax.default_backend() == "gpu" and validation._gpu_supports_triton(jax.devices()[0])


def interpret_mode() -> bool:
  """The `interpret=` argument that runs the kernels here: False on a GPU that compiles them (so a test run
  on the H200 certifies the compiled kernels), True on CPU (and on older GPUs) for Pallas' interpret mode."""
  return not kernels_compile_here()
