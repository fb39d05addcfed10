#!/usr/bin/env bash
# Installs JAX's CUDA 12 plugin and nvcc BESIDE .venv, in .cuda-plugin/site (never into .venv), for
# the deviceless H100 compile (jaxrm/deviceless.py: `scripts/memory_plan.py --target h100`,
# `scripts/attention_compile.py`). No GPU or driver is needed. Versions: scripts/constraints.txt
# (the plugin must match .venv's jaxlib). Downloads ~223 MB of wheels, ~570 MB installed; idempotent.
# Usage: scripts/cuda_plugin.sh [FOLDER]   (default: .cuda-plugin, or $JAXRM_CUDA_PLUGIN)
set -euo pipefail
cd "$(dirname "$0")/.."
folder="${1:-${JAXRM_CUDA_PLUGIN:-.cuda-plugin}}"
python=".venv/bin/python"
if [ ! -x "$python" ]; then
  echo "error: no .venv: run scripts/setup_env.sh first" >&2
  exit 2
fi
pins=()
for name in jax-cuda12-plugin jax-cuda12-pjrt nvidia-cuda-nvcc-cu12; do
  pin="$(grep -i "^${name}==" scripts/constraints.txt || true)"
  if [ -z "$pin" ]; then
    echo "error: scripts/constraints.txt pins no ${name}" >&2
    exit 2
  fi
  pins+=("$pin")
done
stamp="${folder}/.installed-$(printf '%s\n' "${pins[@]}" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
rm -rf "${folder}"
mkdir -p "${folder}/wheels"
"$python" -m pip download -q --no-deps --only-binary=:all: -d "${folder}/wheels" "${pins[@]}"
"$python" -m pip install -q --no-deps --no-index --target "${folder}/site" "${folder}"/wheels/*.whl
rm -rf "${folder}/wheels"
touch "$stamp"
echo "jaxrm: CUDA plugin for deviceless compiles in ${folder}: ${pins[*]}" >&2
