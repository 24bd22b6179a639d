"""Orchestration: the grid of runs × models × seeds, each cell scored on the same test
split, resumable, with results, predictions and a manifest written to the output folder.

A cell's folder is `<run>/` when the experiment has one model and one seed, else
`<run>/<model>/seed-<seed>/`; every cell's `manifest.json` says which cell it is.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from taskfit.config import Experiment, ModelConfig, RunConfig, load_experiment
from taskfit.errors import TaskfitError, did_you_mean
from taskfit.evaluation import compute_metrics
from taskfit.evaluation.aggregate import aggregate_seeds
from taskfit.manifest import environment, peak_memory_mb
from taskfit.models.base import LM, Request
from taskfit.prompting.strategy import Query, ScorePrompt
from taskfit.store import ScoreCache, atomic_write, merge_results
from taskfit.tasks import Task, load_task

log = logging.getLogger(__name__)

CHUNK = 64
"""Examples scored per model call and per cache append; fixed so resumed runs batch alike."""


@dataclass(frozen=True)
class Cell:
    run: str
    model: ModelConfig
    seed: int
    folder: str
    """Relative to the output folder."""
    label: str
    """Key in results.json: the run, or `run@model` when the grid has several models."""


@dataclass
class Plan:
    experiment: Experiment
    task: Task
    runs: dict[str, RunConfig]
    cells: list[Cell]
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
    seeds = [seed] if seed is not None else cfg.seed_list
    p = Plan(experiment, load_task(experiment), runs, grid(cfg.model_list, runs, seeds), limit)
    for cell in p.cells:  # render every prompt once: template and data errors surface now
        prompt = ScorePrompt(runs[cell.run].prompt, p.task, cell.seed, f"runs.{cell.run}.prompt")
        for ex in p.test_examples():
            prompt.query(ex)
    return p


def grid(models: list[ModelConfig], runs: dict[str, RunConfig], seeds: list[int]) -> list[Cell]:
    slugs = _slugs(models)
    cells = []
    for name, run_cfg in runs.items():
        run_models = [run_cfg.model] if run_cfg.model else models
        for model in run_models:
            slug = slugs.get(model) or _slugs([model])[model]
            for seed in seeds:
                simple = len(run_models) == 1 and len(seeds) == 1
                folder = name if simple else f"{name}/{slug}/seed-{seed}"
                label = name if len(models) == 1 or run_cfg.model else f"{name}@{slug}"
                cells.append(Cell(name, model, seed, folder, label))
    return cells


def _slugs(models: list[ModelConfig]) -> dict[ModelConfig, str]:
    out: dict[ModelConfig, str] = {}
    for model in models:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.name).name or model.name).strip("-.") or "model"
        if model.dtype != "auto" and any(m.name == model.name and m != model for m in models):
            base += f"-{model.dtype}"
        slug, n = base, 2
        while slug in out.values():
            slug, n = f"{base}-{n}", n + 1
        out[model] = slug
    return out


def run(
    path: str | Path,
    only: list[str] | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    seed: int | None = None,
    lm: LM | None = None,
    progress=None,
) -> dict[str, Any]:
    """Run the experiment and return results.json's content for the cells run now.
    `lm` replaces every configured model (tests)."""
    p = plan(path, only, limit, seed)
    cfg = p.experiment.config
    out_dir = Path(out) if out else Path("runs") / cfg.name
    per_cell: dict[Cell, dict] = {}
    for model, cells in _by_model(p.cells).items():
        model_lm = lm or _load(model)
        cache = ScoreCache.for_model(out_dir, model_lm.identity)
        for cell in cells:
            per_cell[cell] = _run_cell(p, cell, model_lm, cache, out_dir, progress)
        del model_lm  # one model in memory at a time
    results = _results(p.cells, per_cell)
    atomic_write(out_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    labels = {c.label for c in grid(cfg.model_list, cfg.runs, cfg.seed_list)} | set(results)
    merged = {k: v for k, v in merge_results(out_dir / "results.json", results).items() if k in labels}
    atomic_write(out_dir / "results.json", json.dumps(merged, indent=2))
    return results


def _load(model: ModelConfig) -> LM:
    from taskfit.models import load_model

    return load_model(model)


def _by_model(cells: list[Cell]) -> dict[ModelConfig, list[Cell]]:
    groups: dict[ModelConfig, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.model, []).append(cell)
    return groups


def _results(cells: list[Cell], per_cell: dict[Cell, dict]) -> dict[str, Any]:
    by_label: dict[str, dict[int, dict]] = {}
    for cell in cells:
        by_label.setdefault(cell.label, {})[cell.seed] = per_cell[cell]
    return {label: aggregate_seeds(seeds) for label, seeds in by_label.items()}


def _run_cell(p: Plan, cell: Cell, lm: LM, cache: ScoreCache, out_dir: Path, progress) -> dict:
    start = time.perf_counter()
    truncated_before = getattr(lm, "truncated", 0)
    run_cfg = p.runs[cell.run]
    prompt = ScorePrompt(run_cfg.prompt, p.task, cell.seed, f"runs.{cell.run}.prompt", chat=lm.chat)
    examples = p.test_examples()
    rows, computed = [], 0
    task_id = progress.add_task(cell.folder, total=len(examples)) if progress else None
    for chunk in _chunks(examples, CHUNK):
        queries = [prompt.query(ex) for ex in chunk]
        scores, n = _score(queries, lm, cache)
        computed += n
        rows.extend(prompt.predict(q, scores) for q in queries)
        if progress:
            progress.advance(task_id, len(chunk))
    cell_dir = out_dir / cell.folder
    atomic_write(cell_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics = _metrics(p, rows, cell.seed)
    truncated = getattr(lm, "truncated", 0) - truncated_before
    if truncated:
        log.warning("%s: %d prompt(s) exceeded the model's context and were cut from the left", cell.folder, truncated)
    manifest = {
        "run": cell.run,
        "label": cell.label,
        "folder": cell.folder,
        "seed": cell.seed,
        "model": lm.identity,
        "task": {"type": p.task.type, "labels": list(p.task.labels or [])},
        "metrics": metrics,
        "examples": len(rows),
        "requests_computed": computed,
        "truncated_prompts": truncated,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "peak_memory_mb": peak_memory_mb(),
        "trainable_parameters": 0,
        "config": run_cfg.model_dump(mode="json"),
        **environment(p.experiment.root),
    }
    atomic_write(cell_dir / "manifest.json", json.dumps(manifest, indent=2))
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


def _metrics(p: Plan, rows: list[dict], seed: int) -> dict:
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
    return compute_metrics(task.metrics, gold, pred, n_classes, seed=seed)
