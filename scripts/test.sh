#!/usr/bin/env bash
# The test command of the README: sets up .venv with the test extra, then runs lint and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test
# JAXRM_DEVICELESS=1: also JAX's CUDA plugin and libtpu beside .venv (~436 MB download), for the
# H100 and TPU compiles of tests/test_deviceless.py (skipped without them)
if [ "${JAXRM_DEVICELESS:-0}" = 1 ]; then
  scripts/deviceless_plugin.sh cuda
  scripts/deviceless_plugin.sh tpu
fi
.venv/bin/ruff check jaxrm tests scripts configs
.venv/bin/python -m pytest -q "$@"
