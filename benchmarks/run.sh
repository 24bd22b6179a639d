#!/usr/bin/env bash
# Run the lm-eval vs taskfit benchmark; extra arguments go to compare_lm_eval.py.
# Creates the benchmark venv (.venv-bench) on first use. Results: benchmarks/out/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-bench/bin/lm_eval ]; then
  python3.11 -m venv .venv-bench
  .venv-bench/bin/pip install torch==2.13.0          # first and alone: keeps the CPU build
  .venv-bench/bin/pip install -r benchmarks/requirements.txt
fi
if ! .venv/bin/taskfit run --help >/dev/null 2>&1; then
  echo "taskfit is not installed in .venv (pip install -e . there first)" >&2
  exit 1
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv-bench/bin/python benchmarks/compare_lm_eval.py "$@"
