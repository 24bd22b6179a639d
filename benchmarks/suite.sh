#!/usr/bin/env bash
# The whole benchmark suite in one command: each comparison with its peer, measured side by
# side, then the table of goals (benchmarks/out/summary.md). Arguments go to run.sh (the
# lm-eval comparison, each tool's fastest of 3 runs by default; --repeat 1 for a quicker
# look). About an hour and three quarters on 2 CPU cores (most of it the generation
# benchmark's one-generate-per-sample baseline, in two dtypes); keep the machine idle.
set -euo pipefail
cd "$(dirname "$0")/.."
benchmarks/run.sh --repeat 3 "$@"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python benchmarks/throughput_bench.py
.venv/bin/python benchmarks/generation_bench.py
.venv/bin/python benchmarks/finetune_bench.py
.venv/bin/python benchmarks/memory_bench.py
.venv/bin/python benchmarks/summary.py
