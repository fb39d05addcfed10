#!/usr/bin/env bash
# Installs a JAX accelerator plugin BESIDE .venv (never into it) for compiles without the
# accelerator (jaxrm/deviceless.py: `scripts/memory_plan.py --target h100|v5e|...`,
# `scripts/attention_compile.py`). No GPU, TPU or driver is needed. Versions:
# scripts/constraints.txt, or for a .venv at another JAX (0.11, 0.12) the plugin of its jaxlib and
# the libtpu its jax names (the plugin must match the venv's jaxlib). PYTHON: another venv's
# interpreter. Idempotent.
#   cuda: jax-cuda12-plugin, jax-cuda12-pjrt and nvidia-cuda-nvcc-cu12 in .cuda-plugin/site
#         (~223 MB of wheels, ~570 MB installed)
#   tpu:  libtpu in .tpu-plugin/site (~213 MB of wheels)
# Usage: scripts/deviceless_plugin.sh cuda|tpu   (JAXRM_CUDA_PLUGIN / JAXRM_TPU_PLUGIN: other folders)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  cuda) folder="${JAXRM_CUDA_PLUGIN:-.cuda-plugin}"
        names=(jax-cuda12-plugin jax-cuda12-pjrt nvidia-cuda-nvcc-cu12) ;;
  tpu) folder="${JAXRM_TPU_PLUGIN:-.tpu-plugin}"; names=(libtpu) ;;
  *) echo "error: usage: scripts/deviceless_plugin.sh cuda|tpu" >&2; exit 2 ;;
esac
python="${PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then
  echo "error: no .venv: run scripts/setup_env.sh first" >&2
  exit 2
fi
# A .venv at another JAX than the pin (0.11 and 0.12 are supported): the plugin of its jaxlib, and
# the libtpu its jax asks for.
mapfile -t own < <("$python" - <<'PY'
import importlib.metadata as metadata
import re

jaxlib = metadata.version("jaxlib")
print(f"jaxlib=={jaxlib}")
print(f"jax-cuda12-plugin=={jaxlib}")
print(f"jax-cuda12-pjrt=={jaxlib}")
for requirement in metadata.requires("jax") or []:
    if match := re.match(r"libtpu\s*(==\s*[^;\s]+)\s*;\s*extra\s*==\s*.tpu.", requirement):
        print("libtpu" + match.group(1).replace(" ", ""))
PY
)
pinned_jaxlib="$(grep -i '^jaxlib==' scripts/constraints.txt || true)"
venv_jaxlib="${own[0]}"
pins=()
for name in "${names[@]}"; do
  pin="$(grep -i "^${name}==" scripts/constraints.txt || true)"
  if [ "$venv_jaxlib" != "$pinned_jaxlib" ]; then
    for candidate in "${own[@]}"; do
      if [[ "$candidate" == "${name}=="* ]]; then pin="$candidate"; fi
    done
  fi
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
echo "jaxrm: $1 plugin for deviceless compiles in ${folder}: ${pins[*]}" >&2
