"""The public benchmark's acceptance criterion (SPEC.md), shared by the tests, experiments/ and the peer harness."""

from __future__ import annotations

import numpy as np


def acceptance_metrics(out, ref) -> dict:
  """The public benchmark's acceptance criterion (SPEC.md) and the project's relative L2 error.

  An element fails only if |out - ref| > 1 and |out - ref| / (|ref| + 1e-8) > 0.3; a non-finite element
  of `out` always fails. The call passes if every element is finite and >= 90 % pass. All in float64.

  Args:
    out: [..] the output under test (any float dtype, NumPy or JAX).
    ref: the reference, same shape.

  Returns:
    dict(matched_ratio=float, rel_l2=float, finite=bool, passed=bool); rel_l2 = ||out - ref|| / ||ref||,
    or ||out|| when ref is all zero (0.0 when both are). An empty output matches fully.

  Raises:
    ValueError: if the shapes differ.
  """
  x = np.asarray(out).astype(np.float64)
  r = np.asarray(ref).astype(np.float64)
  if x.shape != r.shape:
    raise ValueError(f"out has shape {list(x.shape)} but ref has shape {list(r.shape)}")
  finite = bool(np.isfinite(x).all())
  with np.errstate(invalid="ignore", over="ignore"):
    err = np.abs(x - r)
    failed = (err > 1.0) & (err / (np.abs(r) + 1e-8) > 0.3)
  matched = np.isfinite(x) & ~failed
  matched_ratio = float(matched.mean()) if matched.size else 1.0
  ref_norm = float(np.linalg.norm(r.ravel()))
  diff_norm = float(np.linalg.norm((x - r).ravel()))
  rel_l2 = diff_norm / ref_norm if ref_norm > 0 else float(np.linalg.norm(x.ravel()))
  return dict(matched_ratio=matched_ratio, rel_l2=rel_l2, finite=finite,
              passed=finite and matched_ratio >= 0.9)
