"""Orchestration: every run of an experiment on its test split, resumable, with results,
predictions and a manifest written to the output directory."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from taskfit.config import Experiment, RunConfig, load_experiment
from taskfit.errors import TaskfitError, did_you_mean
from taskfit.evaluation import compute_metrics
from taskfit.manifest import environment, peak_memory_mb
from taskfit.models.base import LM, Request
from taskfit.prompting.strategy import Query, ScorePrompt
from taskfit.store import ScoreCache, atomic_write, merge_results
from taskfit.tasks import Task, load_task

log = logging.getLogger(__name__)

CHUNK = 64
"""Examples scored per model call and per cache append; fixed so resumed runs batch alike."""


@dataclass
class Plan:
    experiment: Experiment
    task: Task
    runs: dict[str, RunConfig]
    seed: int
    limit: int | None

    def test_examples(self):
        test = self.task.split("test")
        return test[: self.limit] if self.limit else test


def plan(path: str | Path, only: list[str] | None = None, limit: int | None = None, seed: int | None = None) -> Plan:
    """Load and check everything that can be checked without a model."""
    experiment = load_experiment(path)
    cfg = experiment.config
    runs = dict(cfg.runs)
    for name in only or []:
        if name not in runs:
            raise TaskfitError(
                f"--only {name}: no run of that name in {experiment.path}.{did_you_mean(name, runs)} "
                f"Runs: {', '.join(runs)}."
            )
    if only:
        runs = {k: v for k, v in runs.items() if k in only}
    if limit is not None and limit < 1:
        raise TaskfitError("--limit must be a positive number of test examples.")
    p = Plan(experiment, load_task(experiment), runs, cfg.seed if seed is None else seed, limit)
    for name, run in runs.items():  # render every prompt once: template and data errors surface now
        prompt = ScorePrompt(run.prompt, p.task, p.seed, f"runs.{name}.prompt")
        for ex in p.test_examples():
            prompt.query(ex)
    return p


def run(
    path: str | Path,
    only: list[str] | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    seed: int | None = None,
    lm: LM | None = None,
    progress=None,
) -> dict[str, Any]:
    """Run the experiment and return {run: metrics}. `lm` replaces the configured model (tests)."""
    p = plan(path, only, limit, seed)
    cfg = p.experiment.config
    out_dir = Path(out) if out else Path("runs") / cfg.name
    if lm is None:
        from taskfit.models import load_model

        lm = load_model(cfg.model)
    cache = ScoreCache.for_model(out_dir, lm.identity)
    results = {}
    for name, run_cfg in p.runs.items():
        results[name] = _run_one(p, name, run_cfg, lm, cache, out_dir, progress)
    atomic_write(
        out_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    )
    merged = {k: v for k, v in merge_results(out_dir / "results.json", results).items() if k in cfg.runs}
    atomic_write(out_dir / "results.json", json.dumps(merged, indent=2))
    return results


def _run_one(p: Plan, name: str, run_cfg: RunConfig, lm: LM, cache: ScoreCache, out_dir: Path, progress) -> dict:
    start = time.perf_counter()
    truncated_before = getattr(lm, "truncated", 0)
    prompt = ScorePrompt(run_cfg.prompt, p.task, p.seed, f"runs.{name}.prompt", chat=lm.chat)
    examples = p.test_examples()
    rows, computed = [], 0
    task_id = progress.add_task(name, total=len(examples)) if progress else None
    for chunk in _chunks(examples, CHUNK):
        queries = [prompt.query(ex) for ex in chunk]
        scores, n = _score(queries, lm, cache)
        computed += n
        rows.extend(prompt.predict(q, scores) for q in queries)
        if progress:
            progress.advance(task_id, len(chunk))
    run_dir = out_dir / name
    atomic_write(run_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics = _metrics(p, rows)
    truncated = getattr(lm, "truncated", 0) - truncated_before
    if truncated:
        log.warning(
            "run %s: %d prompt(s) were longer than the model's context and were cut from the left", name, truncated
        )
    manifest = {
        "run": name,
        "seed": p.seed,
        "model": lm.identity,
        "examples": len(rows),
        "requests_computed": computed,
        "truncated_prompts": truncated,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "peak_memory_mb": peak_memory_mb(),
        "config": run_cfg.model_dump(mode="json"),
        **environment(p.experiment.root),
    }
    atomic_write(run_dir / "manifest.json", json.dumps(manifest, indent=2))
    return metrics


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _score(queries: list[Query], lm: LM, cache: ScoreCache) -> tuple[dict[Request, float], int]:
    wanted = list(dict.fromkeys(r for q in queries for reqs in q.requests for r in reqs))
    scores = {r: cache.get(r) for r in wanted}
    missing = [r for r, lp in scores.items() if lp is None]
    if missing:
        fresh = dict(zip(missing, lm.loglikelihood(missing)))
        cache.add(fresh)
        scores.update(fresh)
    return scores, len(missing)


def _metrics(p: Plan, rows: list[dict]) -> dict:
    task = p.task
    if task.type == "classification":
        index = {label: i for i, label in enumerate(task.labels)}
        gold = [index[r["label"]] for r in rows]
        pred = [index[r["prediction"]] for r in rows]
        n_classes = len(task.labels)
    else:
        gold = [r["label"] for r in rows]
        pred = [r["prediction"] for r in rows]
        n_classes = max(len(ex.options) for ex in p.test_examples())
    return compute_metrics(task.metrics, gold, pred, n_classes, seed=p.seed)
