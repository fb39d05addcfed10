#!/usr/bin/env bash
# The test command of the README: sets up .venv with the test extra, then runs lint and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test
# JAX's CUDA plugin and libtpu beside .venv (~436 MB download, once), for the H100 and TPU compiles
# of tests/test_deviceless.py; JAXRM_DEVICELESS=0 skips them (the tests then skip, saying why)
if [ "${JAXRM_DEVICELESS:-1}" = 1 ]; then
  for plugin in cuda tpu; do
    scripts/deviceless_plugin.sh "$plugin" || echo "jaxrm: no $plugin plugin; its deviceless tests skip" >&2
  done
fi
.venv/bin/ruff check jaxrm tests scripts configs
.venv/bin/python -m pytest -q "$@"
