#!/usr/bin/env bash
# Creates .venv (if missing) and installs jaxrm with pinned, tested versions, with the JAX build for
# this host's accelerator: JAXRM_ACCELERATOR=cpu|cuda|tpu, or detected (scripts/detect_accelerator.py).
# CUDA hosts get JAX's CUDA 12 build, or CUDA 13 with JAXRM_CUDA=13 (needs an NVIDIA driver >= 580).
# A .venv built for another accelerator is rebuilt, never mixed. Idempotent and quick when
# everything is already installed. Usage: scripts/setup_env.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
detected="$("$PYTHON" scripts/detect_accelerator.py)"
accelerator="${detected%% *}"
echo "jaxrm setup: accelerator ${accelerator} (${detected#* })" >&2
if [ "$accelerator" = "cuda" ]; then
  case "${JAXRM_CUDA:-12}" in
    12|13) accelerator="cuda${JAXRM_CUDA:-12}" ;;
    *) echo "error: JAXRM_CUDA must be 12 or 13, got '${JAXRM_CUDA}'" >&2; exit 2 ;;
  esac
fi
marker=".venv/.jaxrm-accelerator"
if [ -x .venv/bin/python ]; then
  # A .venv from before accelerators were recorded holds the CPU build; one marked `cuda`, from
  # before CUDA 13, the CUDA 12 build.
  built_for="$(cat "$marker" 2>/dev/null || echo cpu)"
  if [ "$built_for" = "cuda" ]; then built_for="cuda12"; fi
  if [ "$built_for" != "$accelerator" ]; then
    echo "jaxrm setup: .venv was built for ${built_for}; rebuilding it for ${accelerator}" >&2
    rm -rf .venv
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  echo "$accelerator" > "$marker"
fi
extras=()
if [ "${1:-}" = "test" ]; then extras+=(test); fi
if [ "$accelerator" != "cpu" ]; then extras+=("$accelerator"); fi
stamp=".venv/.jaxrm-installed-${accelerator}-${1:-main}-$(cat pyproject.toml scripts/constraints.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch (test extra): the CPU wheel, pinned (an unpinned torch pulls gigabytes of CUDA packages).
  spec="."
  if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
  .venv/bin/python -m pip install -q -c scripts/constraints.txt -e "$spec"
  touch "$stamp"
fi
