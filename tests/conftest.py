"""Fixtures shared by the tests: seeds derived from the test's name (STYLE.md: fresh random inputs per case)."""

from __future__ import annotations

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
