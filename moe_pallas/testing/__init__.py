"""Test helpers shared by tests/, experiments/ and the peer harness.

- `inputs`: random layer inputs like the public benchmark's (`random_weights`, `random_activations`,
  `random_layer_inputs`, the routing `SCENARIOS`, `seed_of` a name).
- `oracle`: the independent float64 NumPy oracle of SPEC.md (`oracle_moe`, `oracle_route`). It imports NumPy
  only, so it can also be loaded by file path (the peer harness does).
- `metrics`: SPEC.md's acceptance criterion (`acceptance_metrics`).
- `device`: `interpret_mode()`, the `interpret=` that runs the kernels here (False on a GPU that compiles them).
"""

from moe_pallas.testing import device, inputs, metrics, oracle
from moe_pallas.testing.device import interpret_mode, kernels_compile_here
from moe_pallas.testing.inputs import (SCENARIOS, LayerInputs, random_activations, random_layer_inputs,
                                       random_weights, seed_of)
from moe_pallas.testing.metrics import acceptance_metrics
from moe_pallas.testing.oracle import oracle_moe, oracle_route

__all__ = [
    "LayerInputs", "SCENARIOS", "acceptance_metrics", "device", "inputs", "interpret_mode", "kernels_compile_here", "metrics", "oracle", "oracle_moe", "oracle_route",
    "random_activations", "random_layer_inputs", "random_weights", "seed_of",
]
