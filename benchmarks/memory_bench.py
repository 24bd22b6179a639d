"""Peak memory of a prompt run as the test split grows: 1k vs 100k synthetic examples.

Builds a tiny Llama (from a config, no download) and a 3-label classification task with
N synthetic test examples, then runs `taskfit run` on it in a fresh process per N and reads
that process's peak resident memory. The JSONL test split is read from disk chunk by chunk
(only row offsets stay in memory), predictions stream to disk, and the metrics keep only
compact per-example arrays, so the peak should barely move with N.

    .venv/bin/python benchmarks/memory_bench.py [--sizes 1000 100000] [--out benchmarks/out/memory]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["negative", "neutral", "positive"]
WORDS = "food service room staff movie book film show meal trip day hotel place cold warm slow quick".split()

CHILD = """
import json, resource, sys, time
from taskfit.experiment import run
start = time.perf_counter()
run(sys.argv[1], out=sys.argv[2])
seconds = time.perf_counter() - start
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds}))
"""


def write_task(folder: Path, n: int) -> Path:
    rng = random.Random(n)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "test.jsonl").open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
            f.write(json.dumps({"id": f"t{i}", "text": text, "label": LABELS[i % 3]}) + "\n")
    (folder / "exp.yaml").write_text(
        f"name: memory\nmodel: {{name: {folder.parent / 'model'}, dtype: float32}}\n"
        "task: {type: classification, data: {test: test.jsonl}, label: label}\n"
        'runs:\n  zero-shot:\n    prompt: {template: "Review: {{ text }}\\nSentiment: {{ answer }}"}\n'
    )
    return folder / "exp.yaml"


def measure(config: Path, out: Path) -> dict:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(config), str(out)], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "memory")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.tiny import build_tiny_model

    if not (args.out / "model" / "config.json").is_file():
        build_tiny_model(args.out / "model")
    rows = []
    for n in args.sizes:
        config = write_task(args.out / f"n{n}", n)
        shutil.rmtree(args.out / f"n{n}" / "run", ignore_errors=True)  # no cached scores: compute them all
        start = time.perf_counter()
        got = measure(config, args.out / f"n{n}" / "run")
        rows.append({"examples": n, **got, "wall_s": time.perf_counter() - start})
        print(f"{n:>8} examples: peak {got['peak_mb']:.0f} MB, run {got['seconds']:.1f} s", flush=True)
    base = rows[0]
    lines = ["| test examples | peak memory (MB) | vs smallest | run time (s) |", "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['examples']:,} | {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f}x "
            f"(+{r['peak_mb'] - base['peak_mb']:.0f} MB) | {r['seconds']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
