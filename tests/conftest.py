"""Fixtures shared by the tests: seeds derived from the test's name (STYLE.md: fresh random inputs per case),
and the `interpret` flag that makes one suite certify the kernels on CPU (interpret mode) and on a GPU
(the compiled Triton kernels)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from moe_pallas import testing

@pytest.fixture
def seed(request) -> int:
  """This test's seed, from its node id: every case (parameters included) draws its own inputs.

  Seeds that belong to no one test (module-scoped fixtures, code run in a worker process) come from
  `moe_pallas.testing.seed_of(name)`, the same derivation.
  """
  return testing.seed_of(request.node.nodeid)


@pytest.fixture
def rng(seed) -> np.random.Generator:
  """A NumPy generator seeded with this test's `seed`."""
  return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def interpret() -> bool:
  """`interpret=` for every kernel and layer call in the tests: False when `jax.default_backend() == "gpu"`
  (on a GPU that compiles the kernels, compute capability >= 8.9), True otherwise. So
  `PYTHONPATH=. python3 -m pytest -q tests` on the H200 runs the compiled kernels, not their interpreter.
  Module-level helpers and hypothesis tests (which take no function-scoped fixtures) call
  `moe_pallas.testing.interpret_mode()`, the same rule."""
  return testing.interpret_mode()
