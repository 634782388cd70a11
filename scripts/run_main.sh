#!/usr/bin/env bash
# The main job on a fresh machine: a Python >= 3.12 virtualenv with the package, then experiments/run_layer.py.
#   bash scripts/run_main.sh                           # the device's defaults (CPU: small shape, T=57)
#   bash scripts/run_main.sh --T=1 --shape=deepseek_v3 # any run_layer.py flag passes through
#   EXTRAS=cuda12 bash scripts/run_main.sh             # install JAX's CUDA 12 wheels (or cuda13) for a GPU
# VENV=path picks the virtualenv (default .venv, reused if it exists); PYTHON=path picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/find_python.sh
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
exec "$venv/bin/python" -m experiments.run_layer "$@"   # from the repository root, so that experiments imports
