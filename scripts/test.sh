#!/usr/bin/env bash
# The test command of the README: sets up .venv with the test extra, then runs lint and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test
.venv/bin/ruff check jaxrm tests scripts configs
.venv/bin/python -m pytest -q "$@"
