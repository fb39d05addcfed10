#!/usr/bin/env bash
# Fills a folder (default .gpu-wheels/) with the wheels scripts/gpu_check.sh installs in a GPU image
# where nothing can be downloaded: the image already has JAX 0.11.x (or 0.12.x) with the CUDA 13
# plugin, PyTorch and Python 3.12 (and numpy, scipy, pyarrow, tensorstore, ...); jaxrm needs more
# (grain, datasets, ml_collections, ...) or newer versions of some (transformers, huggingface_hub).
# Run it here, with network access; carry the folder to the GPU machine beside the checkout.
#
# It resolves jaxrm's dependencies for CPython 3.12 on manylinux x86-64 at the pins of
# scripts/constraints.txt, with the image's JAX (GPU_JAX_VERSION, default 0.11.2) in place of
# 0.10.2 and a flax that runs on it (GPU_FLAX_VERSION, default 0.12.10), then downloads (no other
# resolution) every wheel of that set but JAX's and the large compiled ones the image has
# (LEFT_TO_THE_IMAGE: numpy, scipy, pyarrow, ...; read off the image's package list,
# .library/device/KINDS.md, 2026-11-17). Small compiled ones are carried too: the image's may pin
# what jaxrm needs newer (its tokenizers 0.23.2 wants huggingface-hub < 2, jaxrm >= 2.4; seen on an
# H100, 2026-11-27).
# gpu_check.sh then lets pip pick from the folder only what the image lacks or has at a version
# outside jaxrm's ranges. About 40 MB.
# The same thing by hand: `pip download --no-deps --only-binary=:all: --python-version 3.12
#   --platform manylinux_2_28_x86_64 ... -d .gpu-wheels NAME==VERSION` for each wheel this prints.
# Usage: scripts/gpu_wheels.sh [FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
folder="${1:-.gpu-wheels}"
python="${PYTHON:-.venv/bin/python}"
jax_version="${GPU_JAX_VERSION:-0.11.2}"
# flax 0.12.8 (the CPU pin) needs JAX < 0.11 (jax.experimental.hijax.HiPrimitive); 0.12.9+ needs
# JAX >= 0.11.1
flax_version="${GPU_FLAX_VERSION:-0.12.10}"
LEFT_TO_THE_IMAGE="jax jaxlib jaxrm numpy scipy pyarrow pandas tensorstore matplotlib pillow ml-dtypes
  fonttools contourpy kiwisolver"
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
target=(--python-version 3.12 --implementation cp --only-binary=:all: "${platforms[@]}")
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# the tested pins, the image's JAX, and nothing of the accelerator or test extras
grep -viE '^(jax|jaxlib|jax-cuda[0-9]+-[a-z]+|libtpu|nvidia-[a-z0-9-]+|torch|pytest|ruff|flax)==' \
  scripts/constraints.txt > "$work/constraints.txt"
printf 'jax==%s\njaxlib==%s\nflax==%s\n' "$jax_version" "$jax_version" "$flax_version" \
  >> "$work/constraints.txt"
"$python" -m pip install -q --dry-run --ignore-installed --report "$work/report.json" \
  --target "$work/unused" "${target[@]}" -c "$work/constraints.txt" .
"$python" - "$work/report.json" "$LEFT_TO_THE_IMAGE" > "$work/wanted.txt" <<'PY'
import json
import re
import sys

report, left = json.load(open(sys.argv[1])), set(sys.argv[2].split())
for item in report["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if name not in left:
        print(f"{name}=={item['metadata']['version']}")
PY
rm -rf "$folder"
mkdir -p "$folder"
# shellcheck disable=SC2046
"$python" -m pip download -q --no-deps "${target[@]}" -d "$folder" $(cat "$work/wanted.txt")
size="$(du -sm "$folder" | cut -f1)"
echo "jaxrm: $(ls "$folder" | wc -l) wheels for the GPU image in ${folder} (${size} MB):" >&2
tr '\n' ' ' < "$work/wanted.txt" >&2
echo >&2
if [ "$size" -gt 60 ]; then
  echo "error: ${folder} holds ${size} MB, more than the 60 MB it may" >&2
  exit 1
fi
