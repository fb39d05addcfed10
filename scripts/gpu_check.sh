#!/usr/bin/env bash
# The whole GPU validation in one command (at most ~8 minutes on one H100), for a GPU image that
# already has JAX 0.11.x or 0.12.x with its CUDA plugin, PyTorch and Python 3.12, where nothing can
# be downloaded. Writes its figures to OUTDIR: gpu_check.md (short tables), gpu_check.json (all of
# it), the JSON of each step, devices.txt and gpu_check.log (every step's output).
#
#   scripts/gpu_wheels.sh                 # here, with network: .gpu-wheels/ (~30 MB); carry it
#   scripts/gpu_check.sh OUTDIR           # there: python3 is the image's Python
#   scripts/gpu_check.sh OUTDIR --cpu-dry-run   # the same steps, tiny, on this CPU with .venv
#
# Steps (each under a time limit; a failed step is recorded and the next one runs; exit status 1
# if any failed):
#   install    jaxrm --no-deps, plus only the wheels of .gpu-wheels/ (JAXRM_GPU_WHEELS) that the
#              image lacks or has outside jaxrm's version ranges (pip resolves against the image
#              with --no-index), into a folder put first on PYTHONPATH: the image is not modified
#   devices    python -m jaxrm.devices (backend, versions, cuDNN check)
#   attention  scripts/attention_check.py: every implementation the table holds for this backend
#              against the T x T reference, values and gradients, float32 and bfloat16
#   bench_attention  scripts/bench_attention.py, each implementation and mask kind at T = 8192,
#              Llama-3.1-8B heads (32 q / 8 kv, head_dim 128), bf16, fwd+bwd, live-pair TFLOP/s
#   bench      scripts/bench.py --preset gpu-1b: jaxrm packed against the PyTorch reference, bf16
#              (JAXRM_GPU_CHECK_FLEX=1: also PyTorch flex_attention with the same tree mask on
#              jaxrm's packed rows, +90 s; left out of the figures if it fails)
#   train      the tiny config end to end (python -m jaxrm.train --config configs/tiny.py)
# JAXRM_GPU_CHECK_STEPS=attention,bench runs only the steps it names (and install): a rerun of
# what failed. JAXRM_GPU_TILES='64,64,32,64,64,32;...' also times pallas with those tiles in
# bench_attention (the tree-mask tile sweep; +40 s to its limit per set of tiles). PYTHON names
# the interpreter (default: python3 on a GPU, .venv/bin/python for the dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == --* ]]; then
  echo "error: usage: scripts/gpu_check.sh OUTDIR [--cpu-dry-run]" >&2
  exit 2
fi
out="$1"
mode="gpu"
if [ "${2:-}" = "--cpu-dry-run" ]; then
  mode="cpu"
elif [ $# -gt 1 ]; then
  echo "error: unknown option '$2' (expected --cpu-dry-run)" >&2
  exit 2
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/jaxrm-gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log="$out/gpu_check.log"
steps="$out/steps.tsv"
: > "$log"
: > "$steps"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "$mode" = "gpu" ]; then
  py="${PYTHON:-python3}"
  wheels="${JAXRM_GPU_WHEELS:-.gpu-wheels}"
  if [ ! -d "$wheels" ]; then
    echo "error: no wheels folder ${wheels}: run scripts/gpu_wheels.sh where pip can download" >&2
    exit 2
  fi
  # what auto runs on a GPU; every feature in bf16, float32 plain (each check ~10 s on an H100)
  check_args=(--rows 2 --length 1024 --heads 8 --kv_heads 2 --head_dim 128
    --implementations cudnn,pallas --float32_features plain)
  bench_attention_args=(--length 8192 --heads 32 --kv_heads 8 --head_dim 128 --dtype bfloat16
    --kinds tree,segments,causal --repeats 5)
  bench_args=(--preset gpu-1b --sides jaxrm,reference)
  train_args=()
  limits=(35 15 170 50 170 40)  # seconds (480 in all): install devices attention bench_attention
  # bench train
  if [ "${JAXRM_GPU_CHECK_FLEX:-0}" = 1 ]; then  # + PyTorch flex_attention on the tree mask
    bench_args=(--preset gpu-1b --sides jaxrm,reference,reference_flex)
    limits[4]=250
  fi
else
  py="${PYTHON:-.venv/bin/python}"
  wheels="$work/no-wheels"  # .venv has every dependency: pip must plan to install none
  mkdir -p "$wheels"
  check_args=(--rows 2 --length 128 --heads 2 --kv_heads 1 --head_dim 16 --dtypes float32
    --features plain,softcap)
  bench_attention_args=(--length 256 --heads 2 --kv_heads 1 --head_dim 16 --dtype float32
    --kinds tree,segments,causal --repeats 1)
  bench_args=(--preset cpu --hidden 64 --layers 2 --heads 4 --kv_heads 2 --intermediate 128
    --vocab 512 --pairs 16 --pairs_per_step 8 --max_length 256 --sides jaxrm,reference)
  train_args=(--config.num_train_epochs=1 --config.eval_steps=0 --config.export_hf=false)
  limits=(120 120 300 120 300 300)
fi
failures=0

run_step() {  # NAME LIMIT COMMAND...: runs COMMAND under `timeout LIMIT`, output to the log
  local name="$1" limit="$2" started rc status seconds
  shift 2
  if [ -n "${JAXRM_GPU_CHECK_STEPS:-}" ] && [ "$name" != install ] \
    && [[ ",${JAXRM_GPU_CHECK_STEPS}," != *",${name},"* ]]; then
    printf '%s\t%s\t%s\n' "$name" "skipped" "0.0" >> "$steps"
    return
  fi
  started="$(date +%s.%N)"
  echo "=== ${name}: $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  rc=$?
  seconds="$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
  if [ "$rc" -eq 0 ]; then
    status="ok"
  elif [ "$rc" -eq 124 ]; then
    status="timed out after ${limit}s"
  else
    status="failed (exit ${rc})"
  fi
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
  printf '%s\t%s\t%s\n' "$name" "$status" "$seconds" >> "$steps"
  echo "gpu_check: ${name}: ${status} (${seconds}s)" >&2
}

install() {  # jaxrm (--no-deps) + what the image lacks from $wheels, into $work/site
  "$py" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|numpy|pyarrow|hf-xet|tokenizers|huggingface-hub|transformers|tensorstore|orbax-checkpoint|safetensors|torch) '
  if ! "$py" -m pip install --dry-run --quiet --no-index --find-links "$wheels" \
    --no-build-isolation --report "$work/plan.json" .; then
    # the image holds a version that pip cannot reconcile with the folder (the resolver says
    # which above): every wheel of the folder then shadows the image's, first on PYTHONPATH
    echo "install: no resolution against the image; installing every wheel of ${wheels}"
    "$py" -m pip install --quiet --no-deps --no-index --target "$work/site" "$wheels"/*.whl \
      || return 1
    "$py" -m pip install --quiet --no-deps --no-index --no-build-isolation --target "$work/site" .
    return
  fi
  "$py" - "$work/plan.json" > "$work/wheels.txt" <<'PY' || return 1
import json
import sys
from urllib.parse import unquote, urlparse

for item in json.load(open(sys.argv[1]))["install"]:
    if item["metadata"]["name"] != "jaxrm":
        print(unquote(urlparse(item["download_info"]["url"]).path))
PY
  echo "from ${wheels}: $(xargs -r -n1 basename < "$work/wheels.txt" | tr '\n' ' ')"
  if [ -s "$work/wheels.txt" ]; then
    xargs "$py" -m pip install --quiet --no-deps --no-index --target "$work/site" \
      < "$work/wheels.txt" || return 1
  fi
  "$py" -m pip install --quiet --no-deps --no-index --no-build-isolation --target "$work/site" .
}
export -f install
export py wheels work

run_step install "${limits[0]}" bash -c install
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
run_step devices "${limits[1]}" bash -c '"$0" -m jaxrm.devices > "$1/devices.txt"' "$py" "$out"
cat "$out/devices.txt" >> "$log" 2>/dev/null
run_step attention "${limits[2]}" "$py" scripts/attention_check.py "${check_args[@]}" \
  --output "$out/attention_check.json"
if [ -n "${JAXRM_GPU_TILES:-}" ]; then
  bench_attention_args+=(--pallas_tiles "$JAXRM_GPU_TILES")
  tile_sets=$(tr ';' '\n' <<< "$JAXRM_GPU_TILES" | grep -c .)
  limits[3]=$((limits[3] + 40 * tile_sets))  # each set: one compile and run per mask kind
fi
run_step bench_attention "${limits[3]}" "$py" scripts/bench_attention.py \
  "${bench_attention_args[@]}" --output "$out/bench_attention.json"
run_step bench "${limits[4]}" "$py" scripts/bench.py "${bench_args[@]}" --output "$out/bench.json"
run_step train "${limits[5]}" "$py" -m jaxrm.train --config configs/tiny.py \
  "--config.output_dir=$work/tiny-run" "${train_args[@]}"
"$py" scripts/gpu_check_report.py "$out" "$mode" "$work/tiny-run/metrics.jsonl"
rm -f "$steps"
if [ "$failures" -gt 0 ]; then
  echo "gpu_check: ${failures} step(s) failed; see ${log}" >&2
  exit 1
fi
echo "gpu_check: all steps passed; figures in ${out}/gpu_check.md" >&2
