#!/usr/bin/env bash
# Creates .venv (if missing) and installs jaxrm with pinned, tested versions. Idempotent and quick
# when everything is already installed. Usage: scripts/setup_env.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.jaxrm-installed-${1:-main}-$(cat pyproject.toml scripts/constraints.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch: the CPU wheel, pinned (an unpinned torch pulls gigabytes of CUDA packages).
  extra=""
  if [ "${1:-}" = "test" ]; then extra="[test]"; fi
  .venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".${extra}"
  touch "$stamp"
fi
