"""Everything tied to jax 0.11.2's Pallas-Triton internals, in one place: a JAX upgrade touches this file.

1. FP8 dot primitives that keep the tensor cores on wgmma. Pallas's stock Triton lowering of `dot` emits
   `tt.dot(a, b, zeros)` with `maxNumImpreciseAcc = 0`; for an fp8 dot with a float32 result Triton then
   refuses wgmma (it needs >= 32) and falls back to `mma.sync` on f16-upcast operands: 487 TFLOP/s plain,
   231 block-scaled on our H100, against 1440 / ~800 with these (shared/reference/PALLAS_TRITON_FP8.md).

     dot_nt(a, b)  = a @ b.T (f32)   for block scaling, where the product is scaled before it is added
     fma(x, y, z)  = x * y + z       one FFMA (XLA's Triton pipeline would emit FMUL + FADD)

   Each is a JAX primitive with two lowerings: a Pallas-Triton rule registered in Pallas's rule table (no
   JAX rule is changed), and a plain-jnp rule so that interpret mode and CPU CI run the same kernels.
2. The int32 offset rule of Pallas-Triton's indexing, and the fix: 64-bit offsets wherever int32 would wrap.
3. `check_pallas_triton_internals`: says clearly what moved if a JAX upgrade breaks any of this
   (pyproject pins the JAX range it was written against).
4. `abstract_gpu`: lowering the kernels to Triton IR on a machine without a GPU (CPU tests of the
   Triton lowering, which interpret mode never exercises).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import mlir

# Triton's own sm_90 default for fp8 dots (CUDAOptions.max_num_imprecise_acc_default): promote the
# accumulator once per dot, which is what lets Triton pick wgmma for fp8 x fp8 -> f32.
MAX_NUM_IMPRECISE_ACC = 2**30
TESTED_JAX_VERSIONS = ("0.11.2",)

try:  # Private Pallas-Triton API, as of jax 0.11.2.
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import math as _math_dialect
  from jax._src.lib.triton import dialect as _tt
  from jax._src.pallas.triton import gpu_info as _gpu_info
  from jax._src.pallas.triton import lowering as _triton_lowering
  from jax._src.pallas.triton import pallas_call_registration as _pallas_call_registration
  _IMPORT_ERROR = None
except ImportError as err:  # pragma: no cover - only on an untested JAX
  _triton_lowering = _pallas_call_registration = _gpu_info = None
  _IMPORT_ERROR = err


def check_pallas_triton_internals() -> None:
  """Raises NotImplementedError naming what moved if the private Pallas-Triton API these rules use is gone.

  NotImplementedError (not RuntimeError): `implementation=None` then falls back to the xla path.
  """
  if _IMPORT_ERROR is not None:
    raise NotImplementedError(
        f"moe_pallas's FP8 dot primitives need jax._src.pallas.triton internals, which failed to import on "
        f"jax {jax.__version__} (tested: {', '.join(TESTED_JAX_VERSIONS)}): {_IMPORT_ERROR}")
  missing = [name for name in ("triton_lowering_rules", "_zeros") if not hasattr(_triton_lowering, name)]
  if not hasattr(getattr(_triton_lowering, "_compute_offsets_from_indices", None), "moe_pallas_stock"):
    missing.append("lowering._compute_offsets_from_indices (64-bit offsets of 2**31+ element arrays)")
  if not hasattr(_pallas_call_registration, "gpu_info_lib"):
    missing.append("pallas_call_registration.gpu_info_lib")
  if not hasattr(_tt, "dot") or not hasattr(_tt, "trans"):
    missing.append("triton dialect dot/trans")
  if missing:
    raise NotImplementedError(
        f"jax {jax.__version__} moved Pallas-Triton internals that moe_pallas's FP8 dot primitives use "
        f"(missing: {', '.join(missing)}; tested: {', '.join(TESTED_JAX_VERSIONS)})")


def _reference_dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _product_shape(a, b):
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"fp8 dot expects a [M, K] and b [N, K], got a {a.shape} and b {b.shape}")
  return (a.shape[0], b.shape[0])


def _triton_dot(a, b, acc):
  # b comes as an [N, K] tile; the transposed view stays K-major in shared memory, which fp8 wgmma needs.
  b_kn = _tt.trans(b, (1, 0))
  return _tt.dot(a, b_kn, acc, input_precision=_tt.InputPrecision.TF32,
                 max_num_imprecise_acc=MAX_NUM_IMPRECISE_ACC)


def _define(name, impl, abstract_eval, triton_rule):
  primitive = jex_core.Primitive(name)
  primitive.def_impl(impl)
  primitive.def_abstract_eval(abstract_eval)
  mlir.register_lowering(primitive, mlir.lower_fun(impl, multiple_results=False))
  if _triton_lowering is not None:
    _triton_lowering.triton_lowering_rules[primitive] = triton_rule
  return primitive


# ---- dot_nt: a @ b.T in float32 ----------------------------------------------------------------------


def _dot_nt_abstract(a, b):
  return jax.core.ShapedArray(_product_shape(a, b), jnp.float32)


def _dot_nt_triton(ctx, a, b):
  [out_aval] = ctx.avals_out
  zeros = _triton_lowering._zeros(ir.RankedTensorType.get(list(out_aval.shape), ir.F32Type.get()))
  return _triton_dot(a, b, zeros)


dot_nt_p = _define("moe_pallas_dot_nt", _reference_dot, _dot_nt_abstract, _dot_nt_triton)


def dot_nt(a, b):
  """a @ b.T in float32 for a [M, K], b [N, K], on wgmma; scale the result before accumulating it."""
  _product_shape(a, b)
  return dot_nt_p.bind(a, b)


# ---- fma: x * y + z with one rounding -----------------------------------------------------------------


def _fma_impl(x, y, z):
  return x * y + z


def _fma_abstract(x, y, z):
  if not (x.shape == y.shape == z.shape and x.dtype == y.dtype == z.dtype):
    raise ValueError(f"fma operands must match, got {x.dtype}{x.shape}, {y.dtype}{y.shape}, {z.dtype}{z.shape}")
  return jax.core.ShapedArray(z.shape, z.dtype)


fma_p = _define("moe_pallas_fma", _fma_impl, _fma_abstract,
                lambda ctx, x, y, z: _math_dialect.fma(x, y, z))


def fma(x, y, z):
  """x * y + z as one fused multiply-add; x and y are broadcast to z's shape and dtype."""
  x = jnp.broadcast_to(x, z.shape).astype(z.dtype)
  y = jnp.broadcast_to(y, z.shape).astype(z.dtype)
  return fma_p.bind(x, y, z)


# ---- int32 offsets ------------------------------------------------------------------------------------

# Pallas-Triton's offset arithmetic (jax 0.11.2, lowering.py `_compute_offsets_from_indices`): int32
# element offsets unless the array is larger than this many bytes.
_INT64_OFFSETS_ABOVE_BYTES = 2**32
_INT32_OFFSET_LIMIT = 2**31


def int32_offsets_overflow(shape, dtype) -> bool:
  """Whether stock Pallas-Triton (jax 0.11.2) would index an array of this shape with overflowing int32 offsets.

  Its lowering switches to 64-bit element offsets only above 2**32 BYTES, while int32 holds element
  offsets below 2**31: a 1-byte array of 2**31 .. 2**32 bytes (e.g. W13 of more than 73 DeepSeek-V3
  experts, 128 per GPU when two GPUs share the 256) would be read at wrapped addresses. `_wide_offsets`
  below gives such arrays 64-bit offsets.
  """
  elements = math.prod(shape)
  return elements >= _INT32_OFFSET_LIMIT and elements * jnp.dtype(dtype).itemsize <= _INT64_OFFSETS_ABOVE_BYTES


def _wide_offsets(stock):
  """`_compute_offsets_from_indices` with 64-bit offsets for every array that int32 cannot index.

  The stock rule reads the array's dtype only to size it in bytes; such an array is presented to it with
  4-byte elements (same shape, so the same element offsets), which puts it above 2**32 bytes. Without this,
  moe_pallas split the weights per expert range, and XLA copied each slice (~3.8 GB a call at 128 experts).
  """
  def compute_offsets(block_info, nd_indexer):
    full = block_info.full_shape_dtype
    if int32_offsets_overflow(full.shape, full.dtype):
      block_info = dataclasses.replace(block_info, full_shape_dtype=full.update(dtype=jnp.dtype(jnp.float32)))
    return stock(block_info, nd_indexer)

  compute_offsets.moe_pallas_stock = stock
  return compute_offsets


def _install_wide_offsets() -> None:
  # Process-wide and idempotent: it changes only offsets that would otherwise wrap, for every Pallas-Triton
  # kernel (ours are lowered when the caller's jit lowers, outside any call of ours).
  current = getattr(_triton_lowering, "_compute_offsets_from_indices", None)
  if current is not None and not hasattr(current, "moe_pallas_stock"):
    _triton_lowering._compute_offsets_from_indices = _wide_offsets(current)


if _triton_lowering is not None:
  _install_wide_offsets()


# ---- lowering without a GPU ---------------------------------------------------------------------------


@contextlib.contextmanager
def abstract_gpu(device_kind: str = "NVIDIA H200"):
  """Within this context Pallas-Triton lowers for `device_kind` even where no GPU is present.

  Use with `jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))`: every kernel is lowered to
  Triton IR (where unsupported operations fail), without compiling or running anything.
  """
  check_pallas_triton_internals()
  version = _gpu_info.gpu_version_from_device_kind(device_kind)
  if version is None:
    raise ValueError(f"device_kind {device_kind!r} is not a GPU that Pallas-Triton knows")
  info = _gpu_info.get_gpu_info_from_version(version)
  saved = _pallas_call_registration.gpu_info_lib.get_gpu_info
  _pallas_call_registration.gpu_info_lib.get_gpu_info = lambda *args, **kwargs: info
  try:
    yield info
  finally:
    _pallas_call_registration.gpu_info_lib.get_gpu_info = saved
