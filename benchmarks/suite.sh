#!/usr/bin/env bash
# The whole benchmark suite in one command: each comparison with its peer, measured side by
# side, then the table of goals (benchmarks/out/summary.md). Arguments go to run.sh (the
# lm-eval comparison), e.g. --repeat 3. About an hour on 2 CPU cores; keep the machine idle.
set -euo pipefail
cd "$(dirname "$0")/.."
benchmarks/run.sh "$@"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python benchmarks/throughput_bench.py
.venv/bin/python benchmarks/generation_bench.py
.venv/bin/python benchmarks/finetune_bench.py
.venv/bin/python benchmarks/memory_bench.py
.venv/bin/python benchmarks/summary.py
