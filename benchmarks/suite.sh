#!/usr/bin/env bash
# The whole benchmark suite in one command: each comparison with its peer, measured side by
# side, then the table of goals (benchmarks/out/summary.md). Arguments go to run.sh (the
# lm-eval comparison, each tool's fastest of 3 runs by default; --repeat 1 for a quicker
# look); `--device cuda` also moves the generation and fine-tuning benchmarks to the GPU
# (throughput and memory follow taskfit's own choice: the GPU when there is one). About an
# hour and three quarters on 2 CPU cores (most of it the generation benchmark's
# one-generate-per-sample baseline, in two dtypes); keep the machine idle.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cpu
previous=""
for arg in "$@"; do
  [ "$previous" = "--device" ] && device="$arg"
  case "$arg" in --device=*) device="${arg#--device=}" ;; esac
  previous="$arg"
done
benchmarks/run.sh --repeat 3 "$@"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python benchmarks/throughput_bench.py
.venv/bin/python benchmarks/generation_bench.py --device "$device"
.venv/bin/python benchmarks/prefix_bench.py
.venv/bin/python benchmarks/finetune_bench.py --device "$device"
.venv/bin/python benchmarks/memory_bench.py
.venv/bin/python benchmarks/summary.py
