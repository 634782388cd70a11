"""FP8 dot primitives for Pallas-Triton kernels that keep the tensor cores on wgmma.

Why: Pallas's stock Triton lowering of `dot` emits `tt.dot(a, b, zeros)` with `maxNumImpreciseAcc = 0`.
For an fp8 dot with a float32 result Triton then refuses wgmma (it needs >= 32) and falls back to
`mma.sync` on f16-upcast operands: 487 TFLOP/s plain, 231 block-scaled on our H100, against 1440 / ~800
with the primitives below (measurements: shared/reference/PALLAS_TRITON_FP8.md).

  dot_acc(a, b, acc) = acc + a @ b.T   one tt.dot with the accumulator inside the MMA
  dot_nt(a, b)       = a @ b.T (f32)   for block scaling, where the product is scaled before it is added
  fma(x, y, z)       = x * y + z       one FFMA (XLA's Triton pipeline would emit FMUL + FADD)

Each is a JAX primitive with two lowerings: a Pallas-Triton rule registered in Pallas's rule table (no
JAX rule is changed), and a plain-jnp rule so that interpret mode and CPU CI run the same kernels.
The Triton rules reach into `jax._src` (private): `check_pallas_triton_internals` says clearly what moved
if a JAX upgrade breaks them, and pyproject pins the JAX range they were written against.
"""

from __future__ import annotations

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
  from jax._src.pallas.triton import lowering as _triton_lowering
  _IMPORT_ERROR = None
except ImportError as err:  # pragma: no cover - only on an untested JAX
  _triton_lowering = None
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


# ---- dot_acc: acc + a @ b.T, accumulated inside the MMA ---------------------------------------------


def _dot_acc_impl(a, b, acc):
  return acc + _reference_dot(a, b)


def _dot_acc_abstract(a, b, acc):
  if acc.shape != _product_shape(a, b) or acc.dtype != jnp.float32:
    raise ValueError(f"dot_acc accumulator must be float32 {_product_shape(a, b)}, got {acc.dtype} {acc.shape}")
  return jax.core.ShapedArray(acc.shape, jnp.float32)


dot_acc_p = _define("moe_pallas_dot_acc", _dot_acc_impl, _dot_acc_abstract,
                    lambda ctx, a, b, acc: _triton_dot(a, b, acc))


def dot_acc(a, b, acc):
  """acc + a @ b.T for a [M, K], b [N, K] (fp8 or bf16), acc float32 [M, N]."""
  _dot_acc_abstract(a, b, acc)
  return dot_acc_p.bind(a, b, acc)


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
