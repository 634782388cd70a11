"""experiments/mosaic_fp8_probe.py: the Mosaic GPU FP8 block-scaled GEMM (DeepGEMM-style promotion).

On CPU the kernel runs in Mosaic GPU interpret mode (wgmma, TMA pipeline, warp specialization simulated)
and is lowered for cuda without a GPU; on a GPU it runs compiled. Either way against a float64 reference.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments import mosaic_fp8_probe as probe

ON_GPU = jax.default_backend() == "gpu"


def _interpret():
  return None if ON_GPU else probe.interpret_params()


@pytest.mark.parametrize("shape,tiles", [
    ((128, 128, 256), dict(tile_m=64, tile_n=128, max_concurrent_steps=4)),
    ((128, 256, 384), dict(tile_m=64, tile_n=256, max_concurrent_steps=2, epi_n=32)),
    ((256, 128, 256), dict(tile_m=64, tile_n=64, max_concurrent_steps=2, w_scale_in_smem=False)),
    # Swapped (the weights as the 128-row operand, 16 tokens as wgmma's N): one column scale block.
    ((256, 16, 384), dict(tile_m=64, tile_n=16, max_concurrent_steps=4)),
])
def test_matches_float64_reference(shape, tiles, seed):
  # Interpret mode multiplies in float32 exactly; the GPU's FP8 wgmma accumulates in reduced precision
  # per 128-long K step (the module docstring derives the 1e-3 bound).
  probe.check(*shape, interpret=_interpret(), tol=1e-3 if ON_GPU else 1e-5, seed=seed, **tiles)


def test_reference_sees_every_scale(seed):
  """The check is sensitive: one weight scale block off by 1 % is far above the tolerance."""
  a, w, sa, sw = probe.make_inputs(128, 256, 256, seed)
  ref = probe.reference(a, w, sa, sw)
  off = probe.reference(a, w, sa, sw.at[1, 1].multiply(1.01))
  assert probe.rel_l2(off, ref) > 1e-3


def test_rejects_bad_tiles():
  a, w, sa, sw = probe.make_inputs(128, 128, 256)
  with pytest.raises(ValueError):
    probe.fp8_block_scaled_matmul(a, w, sa, sw, tile_m=128)  # CTA tile 256 rows > M


@pytest.mark.skipif(ON_GPU, reason="the CPU check of lowering without a GPU")
def test_lowers_for_cuda_without_gpu():
  text = probe.lower_for_cuda(256, 256, 512, tile_m=64, tile_n=128, max_concurrent_steps=4)
  assert "mosaic_gpu" in text and "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in text
