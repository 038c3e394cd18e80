#!/usr/bin/env bash
# Every GPU figure benchmarks/RESULTS.md owes, in one call (see benchmarks/gpu.py): run it first whenever a
# GPU is at hand. Arguments go to gpu.py (--out-dir DIR, --budget SECONDS, --parts ..., --tiny).
#   benchmarks/gpu.sh --out-dir gpu-figures
# PYTHON picks the interpreter (default: python); the repository's src/ comes first on the path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$root/benchmarks/gpu.py" "$@"
