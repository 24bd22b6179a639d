"""Time `taskfit.report.write_report` on a synthetic experiment of realistic size.

Writes an experiment folder as `taskfit run` would (config.yaml, results.json, and per cell
manifest.json + predictions.jsonl): 10 runs x 3 seeds x 500 test examples of a 3-label
classification task, with seeded random predictions and option scores. Then times
write_report twice: without comparison.json (the report computes the paired comparisons
itself, the slow path) and with the comparison.json that `taskfit compare` would write.

    .venv/bin/python benchmarks/report_bench.py [--out benchmarks/out/report_bench] [--runs 10 --seeds 3 --examples 500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from taskfit.evaluation import compute_metrics
from taskfit.evaluation.aggregate import aggregate_seeds

LABELS = ["negative", "neutral", "positive"]
TEMPLATES = ["Review: {{ text }}\nSentiment: {{ answer }}", "{{ text }} All in all, it was {{ answer }}."]
SHOTS = [0, 1, 2, 4, 8]
MODEL = {"name": "synthetic-lm", "dtype": "float32", "device": "cpu", "sha256": "0" * 64}


def run_config(i: int) -> dict:
    return {
        "prompt": {
            "template": TEMPLATES[i % len(TEMPLATES)],
            "answers": None,
            "combine": "logsumexp",
            "shots": SHOTS[(i // len(TEMPLATES)) % len(SHOTS)],
            "demos": "random",
            "separator": "\n\n",
            "normalize": "none",
            "chat": False,
        },
        "model": None,
    }


def predictions(rng: np.random.Generator, gold: np.ndarray, skill: float, texts: list[str], shots: int) -> list[dict]:
    """Rows in predictions.jsonl's format: right with probability `skill`, scores consistent with the prediction."""
    n = len(gold)
    right = rng.random(n) < skill
    pred = np.where(right, gold, (gold + rng.integers(1, len(LABELS), n)) % len(LABELS))
    scores = rng.normal(-6.0, 2.0, size=(n, len(LABELS)))
    scores[np.arange(n), pred] = scores.max(axis=1) + rng.exponential(1.0, n)
    demos = "".join(f"Review: {texts[(k * 7) % n]}\nSentiment: {LABELS[k % 3]}\n\n" for k in range(shots))
    return [
        {
            "id": f"test-{j}",
            "label": LABELS[gold[j]],
            "prediction": LABELS[pred[j]],
            "correct": bool(right[j]),
            "scores": [round(float(s), 4) for s in scores[j]],
            "prompt": f"{demos}Review: {texts[j]}\nSentiment: ",
        }
        for j in range(n)
    ]


def write_cell(out: Path, run: str, i: int, seed: int, gold: np.ndarray, texts: list[str]) -> dict:
    rng = np.random.default_rng(1000 * i + seed)
    config = run_config(i)
    rows = predictions(rng, gold, 0.45 + 0.04 * i + rng.normal(0, 0.02), texts, config["prompt"]["shots"])
    index = {label: k for k, label in enumerate(LABELS)}
    pred = [index[r["prediction"]] for r in rows]
    metrics = compute_metrics(("accuracy", "macro_f1"), gold.tolist(), pred, len(LABELS), seed=seed)
    folder = f"{run}/synthetic-lm/seed-{seed}"
    manifest = {
        "run": run, "label": run, "folder": folder, "seed": seed, "model": MODEL,
        "task": {"type": "classification", "labels": LABELS}, "metrics": metrics,
        "examples": len(rows), "requests_computed": 3 * len(rows), "truncated_prompts": 0,
        "wall_time_s": round(float(20 + 5 * config["prompt"]["shots"] + rng.normal(0, 1)), 3),
        "peak_memory_mb": {"cpu_rss": round(float(900 + 40 * i + rng.normal(0, 5)), 1)},
        "trainable_parameters": 0, "config": config,
        "versions": {"python": "3.11", "taskfit": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0"},
        "git_commit": None,
    }  # fmt: skip
    (out / folder).mkdir(parents=True, exist_ok=True)
    (out / folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (out / folder / "predictions.jsonl").write_text(lines, encoding="utf-8")
    return metrics


def synthesize(out: Path, runs: int, seeds: int, examples: int) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    gold = rng.integers(0, len(LABELS), examples)
    texts = [" ".join(rng.choice(["good", "bad", "fine", "the", "food", "was", "service"], 12)) for _ in gold]
    texts[0] = "a very long review " * 150  # a prompt the report must truncate
    results = {}
    for i in range(runs):
        run = f"run-{i:02d}"
        per_seed = {seed: write_cell(out, run, i, seed, gold, texts) for seed in range(seeds)}
        results[run] = aggregate_seeds(per_seed)
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    config = {"name": "report-bench", "task": {"type": "classification"}, "seeds": list(range(seeds))}
    (out / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def timed_report(out: Path) -> float:
    from taskfit.report import write_report

    start = time.perf_counter()
    write_report(out)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/report_bench"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=500)
    args = parser.parse_args()
    synthesize(args.out, args.runs, args.seeds, args.examples)
    print(f"{args.runs} runs x {args.seeds} seeds x {args.examples} examples in {args.out}")
    print(f"write_report, comparisons computed by the report: {timed_report(args.out):.1f} s")
    from taskfit.compare import compare_cells
    from taskfit.rundir import load_cells

    comparison = compare_cells(load_cells([args.out]))
    (args.out / "comparison.json").write_text(json.dumps(comparison), encoding="utf-8")
    print(f"write_report, comparison.json present:      {timed_report(args.out):.1f} s")
    print(f"report: {args.out / 'report.html'} ({(args.out / 'report.html').stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
