#!/usr/bin/env bash
# The README's main-job command: sets up .venv, then trains. Default: the offline tiny config.
# Usage: scripts/train.sh [configs/x.py] [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
config="configs/tiny.py"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then config="$1"; shift; fi
exec .venv/bin/python -m jaxrm.train --config "$config" "$@"
