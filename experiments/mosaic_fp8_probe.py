"""Probe: a Pallas Mosaic GPU (Hopper) FP8 block-scaled GEMM with DeepGEMM-style scale promotion.

    out[M, N] (float32) = sum_kb (a[:, kb] @ w[:, kb].T) * a_scale[kb, :][:, None] * w_scale[nb, kb]

a [M, K] and w [N, K] are both K-major float8_e4m3fn (the layout of our expert weights; FP8 wgmma takes
only K-major operands), a_scale [K/128, M] float32 (1x128 activation blocks), w_scale [N/128, K/128]
float32 (128x128 weight blocks). One K step is 128 wide (one scale block).

Kernel structure (lane semantics, the layout of jax's attention_mgpu backward kernels):
- grid (M / (2 * tile_m), N / tile_n); per CTA three warpgroups: one TMA producer and two compute
  warpgroups (`plgpu.emit_pipeline_warp_specialized`), each owning tile_m rows of the CTA tile.
- pipeline over K steps (max_concurrent_steps stages): a block (2*tile_m, 128), w block (tile_n, 128),
  both tiled + 128-byte swizzled, and the activation scales block (1, 2*tile_m) (float32, TMA as well).
- per K step and compute warpgroup: for each 128-wide column chunk of the tile, a wgmma of
  (tile_m, 128) x (128, 128)^T into a FRESH zero accumulator (`pl.run_scoped(..., plgpu.ACC)`), read it back
  to registers (wgmma wait), and promote: carry += product * (a_scale_rows * w_scale)[:, None] on a
  float32 register carry with the WGMMA layout. The per-row factor is a WGMMA_ROW vector (few registers a
  thread); w_scale is one scalar per (128-column chunk, K step), loaded from GMEM.
- epilogue: the carry goes out in (tile_m, 64) float32 chunks through SMEM + TMA.

Usage:
  PYTHONPATH=. python3 experiments/mosaic_fp8_probe.py --interpret     # CPU: interpret mode, small shape
  PYTHONPATH=. python3 experiments/mosaic_fp8_probe.py --lower_only    # CPU: try lowering for cuda
  PYTHONPATH=. python3 experiments/mosaic_fp8_probe.py                 # GPU: check + time the large shapes
  PYTHONPATH=. python3 experiments/mosaic_fp8_probe.py --tile_m=64 --tile_n=128 --max_concurrent_steps=4
  PYTHONPATH=. python3 experiments/mosaic_fp8_probe.py --tile_n=256 --epi_n=32   # 4 stages fit only so
  PYTHONPATH=. python3 experiments/mosaic_fp8_probe.py --now_scale_in_smem       # scalar GMEM weight scales
  # Swapped, as a small-T GEMM1 would run it: 14 experts' W13 stacked as the 128-row operand (M = 14 x 4096),
  # 16 token rows as wgmma's N (tile_n=16: the tokens' scale block is one, cdiv(N, 128) = 1 row of w_scale).
  PYTHONPATH=. python3 experiments/mosaic_fp8_probe.py --tile_n=16 --small_shape=256,16,384 \
      --shapes=57344x16x7168 --max_concurrent_steps=8

Error bound (check (a)): the reference is float64 on the same FP8 values and float32 scales, so input
quantisation is not part of the error. What remains:
(1) Hopper's FP8 wgmma accumulates inside one 128-long K step with a reduced-precision adder (DeepGEMM's
    measurement: ~14 mantissa bits kept, u ~ 2^-14 ~ 6e-5 per addition). Rounding errors of random sign
    over 128 additions grow like a random walk: ~ sqrt(128) * u ~ 7e-4 of the partial sum's magnitude
    (worst case, all errors aligned: 128 * u ~ 8e-3, not seen with random data).
(2) The promotion adds K/128 scaled partial sums in float32 (u = 6e-8): ~ sqrt(56) * 6e-8 ~ 5e-7, negligible.
The per-step errors are independent and each is ~7e-4 of its own partial sum, and the partial sums add up
like the errors do (random signs), so the ratio carries over to the whole: rel-L2 ~ 7e-4 at most, in
practice less (truncation of independent products partly cancels). So 1e-3 is the right order on the GPU;
a promotion bug (a missing or misplaced scale) gives O(1). In interpret mode the products are exact float32
matmuls: rel-L2 ~ 1e-7 (the tests use 1e-5 there).
"""

from __future__ import annotations

import functools
import math
import time

from absl import app
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK = 128  # scale block (and K step)


def _define_flags() -> None:
  """The script's flags, defined when it runs as a script only: tests import this module into a process
  whose absl registry already holds benchmark.py's flags of the same names (iters, warmup)."""
  global _INTERPRET, _LOWER_ONLY, _SMALL_SHAPE, _SHAPES, _TILE_M, _TILE_N, _STEPS, _ITERS, _WARMUP, _WS_SMEM
  global _EPI_N, _CHECK
  _INTERPRET = flags.DEFINE_bool("interpret", False, "Run in Mosaic GPU interpret mode on CPU at --small_shape.")
  _LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Only trace and lower for cuda (works without a GPU).")
  _SMALL_SHAPE = flags.DEFINE_string("small_shape", "128,128,256", "M,N,K for --interpret / --lower_only.")
  _SHAPES = flags.DEFINE_string("shapes", "4096x4096x7168,8192x8192x7168,8192x4096x7168,4096x7168x2048",
                                "MxNxK list (comma separated) for the GPU timing.")
  _TILE_M = flags.DEFINE_integer("tile_m", 64, "Rows per compute warpgroup (CTA tile is 2*tile_m rows).")
  _TILE_N = flags.DEFINE_integer("tile_n", 128, "Columns per CTA tile (64, 128, or a multiple of 128).")
  _STEPS = flags.DEFINE_integer("max_concurrent_steps", 4, "Pipeline stages.")
  _ITERS = flags.DEFINE_integer("iters", 20, "Timed calls per shape (GPU).")
  _WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls per shape (GPU).")
  _WS_SMEM = flags.DEFINE_bool("w_scale_in_smem", True,
                               "Weight scales through the TMA pipeline (SMEM) instead of scalar GMEM loads.")
  _EPI_N = flags.DEFINE_integer("epi_n", 64, "Epilogue chunk width (float32 SMEM: 2 x tile_m x epi_n x 4 bytes); "
                                "32 frees 16 KiB, e.g. for --tile_n=256 --max_concurrent_steps=4.")
  _CHECK = flags.DEFINE_bool("check", True, "Check every shape against the float64 reference.")


def fp8_block_scaled_matmul(a, w, a_scale, w_scale, *, tile_m: int = 64, tile_n: int = 128,
                            max_concurrent_steps: int = 4, w_scale_in_smem: bool = True,
                            epi_n: int = 64, interpret=None):
  """out[M, N] f32 = sum_kb (a[:, kb] @ w[:, kb].T) * a_scale[kb][:, None] * w_scale[n // 128, kb]."""
  m, k = a.shape
  n, k2 = w.shape
  if k != k2:
    raise ValueError(f"K mismatch: {a.shape=} {w.shape=}")
  if a.dtype != jnp.float8_e4m3fn or w.dtype != jnp.float8_e4m3fn:
    raise ValueError(f"expected float8_e4m3fn operands, got {a.dtype}, {w.dtype}")
  if a_scale.shape != (k // BLOCK, m) or w_scale.shape != (pl.cdiv(n, BLOCK), k // BLOCK):
    raise ValueError(f"scale shapes {a_scale.shape}, {w_scale.shape} for {m=} {n=} {k=}")
  cta_m = 2 * tile_m  # two compute warpgroups, stacked along M
  sub_n = min(tile_n, BLOCK)  # one wgmma / one weight scale per 128 columns
  if tile_n > BLOCK and tile_n % BLOCK:
    raise ValueError(f"{tile_n=} must be <= 128 or a multiple of 128")
  if BLOCK % sub_n:
    raise ValueError(f"{tile_n=} must divide 128")
  num_sub = tile_n // sub_n
  if m % cta_m or n % tile_n or k % BLOCK:
    raise ValueError(f"{m=} {n=} {k=} not divisible by CTA tile ({cta_m}, {tile_n}, {BLOCK})")
  k_iters = k // BLOCK
  epi_n = min(epi_n, tile_n)
  # Rows of the transposed weight scales, padded to a multiple of 32 float32 (128 bytes): each pipeline stage
  # of that block is a TMA destination, and TMA needs 128-byte aligned SMEM. 4 columns (16 bytes, TMA's
  # minimum row) put stage 1 at +16 bytes: CUDA_ERROR_MISALIGNED_ADDRESS on the H200 (2026-11-30).
  ws_cols = -(-pl.cdiv(n, BLOCK) // 32) * 32

  fp8_swizzle = plgpu.find_swizzle(BLOCK * 8)  # 128 fp8 = 128 bytes
  fp8_transforms = (plgpu.TilingTransform((8, fp8_swizzle)), plgpu.SwizzleTransform(fp8_swizzle))
  out_swizzle = plgpu.find_swizzle(epi_n * 32)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // 4)), plgpu.SwizzleTransform(out_swizzle))

  def kernel(a_gmem, w_gmem, as_gmem, ws_gmem, out_gmem, out_smem):
    mi = lax.axis_index("m")
    ni = lax.axis_index("n")
    wg = lax.axis_index("wg")
    rows = pl.ds(wg * tile_m, tile_m)  # this compute warpgroup's rows inside the CTA tile

    def compute_context(eval_pipeline):
      zero = plgpu.layout_cast(jnp.zeros((tile_m, sub_n), jnp.float32), plgpu.Layout.WGMMA)
      accs = eval_pipeline(tuple(zero for _ in range(num_sub)))
      for j in range(num_sub):
        for e in range(sub_n // epi_n):
          out_smem[wg] = accs[j][:, e * epi_n:(e + 1) * epi_n]
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(
              out_smem.at[wg],
              out_gmem.at[pl.ds(mi * cta_m + wg * tile_m, tile_m),
                          pl.ds(ni * tile_n + j * sub_n + e * epi_n, epi_n)])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def step(idxs, a_smem, w_smem, as_smem, *rest):
      (kb,) = idxs
      if w_scale_in_smem:
        ws_smem, carry = rest
      else:
        (carry,) = rest
      # Scale loads first, so that their latency overlaps the wgmmas.
      row_scale = plgpu.load(as_smem.at[0, rows], layout=plgpu.Layout.WGMMA.reduce(1))
      factors = []
      for j in range(num_sub):
        nb = ni * num_sub + j if sub_n == BLOCK else (ni * tile_n) // BLOCK
        ws = ws_smem[0, nb] if w_scale_in_smem else ws_gmem[nb, kb]
        factors.append(lax.broadcast_in_dim(row_scale * ws, (tile_m, sub_n), [0]))
      a_rows = a_smem.at[rows]

      def products(*acc_refs):
        # All wgmmas of this K step are issued before the first read, which waits for all of them.
        for j, acc_ref in enumerate(acc_refs):
          plgpu.wgmma(acc_ref, a_rows, w_smem.at[pl.ds(j * sub_n, sub_n)].transpose((1, 0)))
        return tuple(acc_ref[...] for acc_ref in acc_refs)

      # Fresh accumulators each K step (zero-initialised: the first wgmma runs with scale-d = 0).
      ps = pl.run_scoped(products, *[plgpu.ACC((tile_m, sub_n), jnp.float32)] * num_sub)
      return tuple(c + p * f for c, p, f in zip(carry, ps, factors))

    pipeline = plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_m, BLOCK), lambda kb: (0, kb), transforms=fp8_transforms),
            plgpu.BlockSpec((tile_n, BLOCK), lambda kb: (0, kb), transforms=fp8_transforms),
            plgpu.BlockSpec((1, cta_m), lambda kb: (kb, 0)),
            *([plgpu.BlockSpec((1, ws_cols), lambda kb: (kb, 0))] if w_scale_in_smem else []),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=max_concurrent_steps,
        compute_context=compute_context,
    )
    pipeline(a_gmem.at[pl.ds(mi * cta_m, cta_m)],
             w_gmem.at[pl.ds(ni * tile_n, tile_n)],
             as_gmem.at[:, pl.ds(mi * cta_m, cta_m)],
             *([ws_gmem] if w_scale_in_smem else []))

  if w_scale_in_smem:
    # [K/B, N/B] (transposed), padded to 128 bytes a row for TMA: one row per K step goes through the
    # pipeline with a and the activation scales, and each compute warpgroup reads its scalar from SMEM.
    w_scale = jnp.pad(w_scale.T, ((0, 0), (0, ws_cols - pl.cdiv(n, BLOCK))))
  f = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, n), jnp.float32),
      scratch_types=[plgpu.SMEM((2, tile_m, epi_n), jnp.float32, transforms=out_transforms)],
      grid=(m // cta_m, n // tile_n),
      grid_names=("m", "n"),
      num_threads=3,
      thread_name="wg",
      interpret=interpret,
  )
  return f(a, w, a_scale, w_scale)


# --------------------------------------------------------------------------------------------- helpers

def make_inputs(m: int, n: int, k: int, seed: int = 0):
  """Random FP8 operands with per-block float32 scales, as DeepSeek-V3's quantizer produces them."""
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((m, k), dtype=np.float32) * 2.0
  w = rng.standard_normal((n, k), dtype=np.float32) * 2.0
  a8 = jnp.asarray(a, jnp.float8_e4m3fn)
  w8 = jnp.asarray(w, jnp.float8_e4m3fn)
  a_scale = jnp.asarray(rng.uniform(0.5, 2.0, (k // BLOCK, m)).astype(np.float32) / 64)
  w_scale = jnp.asarray(rng.uniform(0.5, 2.0, (pl.cdiv(n, BLOCK), k // BLOCK)).astype(np.float32) / 64)
  return a8, w8, a_scale, w_scale


def reference(a8, w8, a_scale, w_scale) -> np.ndarray:
  """float64 NumPy reference of the block-scaled product."""
  a = np.asarray(a8.astype(jnp.float32), np.float64)
  w = np.asarray(w8.astype(jnp.float32), np.float64)
  sa = np.asarray(a_scale, np.float64)  # [K/B, M]
  sw = np.asarray(w_scale, np.float64)  # [N/B, K/B]
  m, k = a.shape
  n = w.shape[0]
  out = np.zeros((m, n))
  for kb in range(k // BLOCK):
    ks = slice(kb * BLOCK, (kb + 1) * BLOCK)
    col_scale = np.repeat(sw[:, kb], BLOCK)[:n]  # [N]
    out += (a[:, ks] @ w[:, ks].T) * sa[kb][:, None] * col_scale[None, :]
  return out


def rel_l2(out, ref) -> float:
  out = np.asarray(out, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def interpret_params():
  return plgpu.InterpretGPUParams()


def check(m, n, k, *, interpret, tol: float = 1e-3, seed: int = 0, **tiles) -> float:
  inputs = make_inputs(m, n, k, seed)
  fn = jax.jit(functools.partial(fp8_block_scaled_matmul, interpret=interpret, **tiles))
  out = jax.block_until_ready(fn(*inputs))
  err = rel_l2(out, reference(*inputs))
  print(f"check {m}x{n}x{k} tiles={tiles} interpret={interpret is not None}: rel-L2 {err:.3e} (tol {tol:g})")
  if not err < tol:
    raise AssertionError(f"rel-L2 {err:.3e} >= {tol:g}")
  return err


def lower_for_cuda(m, n, k, **tiles):
  """Traces and lowers for cuda on a machine without a GPU; returns the lowered text's size or raises."""
  args = [jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn),
          jax.ShapeDtypeStruct((k // BLOCK, m), jnp.float32),
          jax.ShapeDtypeStruct((pl.cdiv(n, BLOCK), k // BLOCK), jnp.float32)]
  fn = jax.jit(functools.partial(fp8_block_scaled_matmul, **tiles))
  lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
  return lowered.as_text()


def time_gpu(m, n, k, **tiles):
  from experiments import timing  # GPU only: the profiler-based timer of the benchmark
  inputs = make_inputs(m, n, k)
  fn = jax.jit(functools.partial(fp8_block_scaled_matmul, **tiles))
  timer = timing.GpuTimer()
  times = timer.time_calls(fn, inputs, iters=_ITERS.value, warmup=_WARMUP.value)
  us = times.median_us
  tflops = 2 * m * n * k / (us * 1e-6) / 1e12
  print(f"time {m}x{n}x{k} tiles={tiles}: {us:.1f} us (kernel sum {times.summary()['kernel_sum_us']:.1f}), "
        f"{tflops:.0f} TFLOP/s, {times.num_kernels} kernels/call")
  return us, tflops


def main(argv):
  del argv
  tiles = dict(tile_m=_TILE_M.value, tile_n=_TILE_N.value, max_concurrent_steps=_STEPS.value,
               w_scale_in_smem=_WS_SMEM.value, epi_n=_EPI_N.value)
  sm, sn, sk = (int(x) for x in _SMALL_SHAPE.value.split(","))
  if _INTERPRET.value:
    t0 = time.perf_counter()
    check(sm, sn, sk, interpret=interpret_params(), tol=1e-5, **tiles)
    print(f"interpret mode: {time.perf_counter() - t0:.1f} s")
    return
  if _LOWER_ONLY.value:
    for shape in ((sm, sn, sk), (4096, 4096, 7168)):
      try:
        text = lower_for_cuda(*shape, **tiles)
        print(f"lowered {shape} for cuda: {len(text)} chars of StableHLO; mosaic_gpu custom call: "
              f"{'mosaic_gpu' in text}")
      except Exception as e:  # report, do not hide: this is what the probe is for
        print(f"lowering {shape} for cuda FAILED: {type(e).__name__}: {e}")
    return
  if jax.default_backend() != "gpu":
    raise app.UsageError("no GPU: use --interpret or --lower_only")
  print(f"device: {jax.devices()[0].device_kind}")
  check(sm, sn, sk, interpret=None, **tiles)
  for shape in _SHAPES.value.split(","):
    m, n, k = (int(x) for x in shape.split("x"))
    if _CHECK.value:
      check(m, n, k, interpret=None, **tiles)
    time_gpu(m, n, k, **tiles)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
