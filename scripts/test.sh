#!/usr/bin/env bash
# The test command of the README: sets up .venv with the test extra, then runs lint and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test
# JAXRM_DEVICELESS=1: also JAX's CUDA plugin beside .venv (~223 MB download), for the H100 compiles
# of tests/test_deviceless.py (skipped without it)
if [ "${JAXRM_DEVICELESS:-0}" = 1 ]; then scripts/cuda_plugin.sh; fi
.venv/bin/ruff check jaxrm tests scripts configs
.venv/bin/python -m pytest -q "$@"
