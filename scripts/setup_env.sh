#!/usr/bin/env bash
# Create (or update) .venv with the pinned CPU stack and megasyne built in editable mode.
# Idempotent: re-running only installs what changed. Used by README's two commands and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=24,<27"
# torch==2.13.0 resolves to the CPU wheel on the CI machines; on a GPU box install a CUDA
# build of torch first and this line keeps it (same version) or pins the CPU one.
.venv/bin/python -m pip install -q -r requirements-ci.txt
# Builds csrc/ (the C++ index builder) now, at install time; fails here, clearly, without g++.
.venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/python -c "import megasyne, megasyne.model.accel as a; print('megasyne', megasyne.__version__, '|', a.describe())"
