"""Orchestration: the grid of runs × models × seeds (× templates or demonstration sets
when a run asks for its spread), each cell scored on the same test split, resumable.

A cell's folder is `<run>/` when the run has one model, one seed and no variants, else
`<run>[/t<i>|/d<j>]/<model>/seed-<seed>/`; every cell's `manifest.json` says which cell it is.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskfit.cell import Cell, check_cell, run_cell
from taskfit.config import Experiment, ModelConfig, RunConfig, dump_config, load_experiment
from taskfit.errors import TaskfitError, did_you_mean
from taskfit.evaluation.aggregate import aggregate_seeds, spread
from taskfit.finetune_cell import check_finetune_cell, check_finetune_run, run_finetune_cell
from taskfit.ignored import ignored_settings
from taskfit.models import frozen_load
from taskfit.models.base import LM
from taskfit.models.cached import CachedLM
from taskfit.store import ScoreCache, atomic_write, check_out_dir, is_main_process, merge_results, read_results
from taskfit.tasks import Task, load_task

log = logging.getLogger(__name__)


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
    if not isinstance(path, str | os.PathLike):
        raise TaskfitError(f"give the path of an experiment YAML file, not {type(path).__name__} {path!r}.")
    only = [only] if isinstance(only, str) else only
    for name, value in (("limit", limit), ("seed", seed)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TaskfitError(f"{name} (--{name}) must be a whole number, not {value!r}.")
    if seed is not None and seed < 0:
        raise TaskfitError(f"seed (--seed) must be 0 or more, not {seed}.")
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
        raise TaskfitError("limit (--limit) must be a positive number of test examples.")
    if cfg.tracking == "mlflow":
        from taskfit.tracking import require_mlflow

        require_mlflow()
    seeds = [seed] if seed is not None else cfg.seed_list
    p = Plan(experiment, load_task(experiment), runs, grid(cfg.model_list, runs, seeds), limit)
    for note in ignored_settings(cfg, p.task.type):
        log.warning("%s: %s", experiment.path.name, note)
    for name, run_cfg in runs.items():
        if run_cfg.finetune:
            check_finetune_run(name, run_cfg.finetune, p.task, p.test_examples())
    for cell in p.cells:  # render every prompt once: template and data errors surface now
        if runs[cell.run].finetune:
            check_finetune_cell(cell, runs[cell.run].finetune, p.task)
        else:
            check_cell(cell, runs[cell.run].prompt, p.task, p.test_examples())
    return p


def grid(models: list[ModelConfig], runs: dict[str, RunConfig], seeds: list[int]) -> list[Cell]:
    slugs = _slugs(models)
    cells = []
    for name, run_cfg in runs.items():
        run_models = [run_cfg.model] if run_cfg.model else models
        variants = _variants(run_cfg)
        for model in run_models:
            slug = slugs.get(model) or _slugs([model])[model]
            for seed in seeds:
                for tag, template, demo_set, size, shots in variants:
                    base = f"{name}/{tag}" if tag else name
                    simple = len(run_models) == 1 and len(seeds) == 1
                    folder = base if simple else f"{base}/{slug}/seed-{seed}"
                    label = (f"{name}[{tag}]" if tag else name) + (
                        "" if len(models) == 1 or run_cfg.model else f"@{slug}"
                    )
                    cells.append(Cell(name, model, seed, folder, label, template, demo_set, size, shots))
    return cells


def _variants(run_cfg: RunConfig) -> list[tuple]:
    """(tag, template index, demo set, train size, shots) per variant: templates with `combine: each`,
    `demo_sets`, fine-tuning `train_sizes`, a list of `shots`."""
    if run_cfg.finetune:
        sizes = run_cfg.finetune.train_sizes
        return [(f"n{s}", None, None, s, None) for s in sizes] if sizes else [("", None, None, None, None)]
    prompt = run_cfg.prompt
    templates = list(range(len(prompt.templates))) if prompt.templates and prompt.combine == "each" else [None]
    demo_sets = list(range(prompt.demo_sets)) if prompt.demo_sets > 1 else [None]
    shot_counts = prompt.shots if isinstance(prompt.shots, list) else [None]
    out = []
    for k in shot_counts:
        for t in templates:
            for d in demo_sets:
                parts = [
                    f"k{k}" if k is not None else "",
                    f"t{t}" if t is not None else "",
                    f"d{d}" if d is not None else "",
                ]
                out.append(("-".join(p for p in parts if p), t, d, None, k))
    return out


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
    main = is_main_process()
    if main:
        check_out_dir(out_dir, Path(path))
    per_cell: dict[Cell, dict] = {}
    tracker = _tracker(cfg, out_dir) if main else None
    try:
        if not _run_cells(p, out_dir, per_cell, tracker, lm, progress):
            return {}
    except BaseException:
        if main:
            _record_finished(out_dir, p.cells, per_cell)
        raise
    results = _results(p.cells, per_cell)
    ran = cfg if seed is None else cfg.model_copy(update={"seed": seed, "seeds": None})  # as run: --seed recorded
    atomic_write(out_dir / "config.yaml", dump_config(ran))
    every = grid(cfg.model_list, cfg.runs, cfg.seed_list)  # results of runs not run now stay
    keep = {c.label for c in every} | {_spread_key(c) for c in every} | set(cfg.runs) | set(results)
    merged = {k: v for k, v in merge_results(out_dir / "results.json", results).items() if k in keep}
    atomic_write(out_dir / "results.json", json.dumps(merged, indent=2))
    return results


def _run_cells(p: Plan, out_dir: Path, per_cell: dict[Cell, dict], tracker, lm: LM | None, progress) -> bool:
    """Run every cell of the plan into `per_cell` (fine-tuning first); False in a process other
    than the main one, which only trains."""
    by_model = _by_model(p.cells)
    # Every process of a multi-process launch trains together; the other cells, and the run's
    # files, are the main process's alone. Fine-tuning comes first so that no process waits in
    # a collective while the main one scores prompts.
    for cells in by_model.values():
        for cell in (c for c in cells if p.runs[c.run].finetune):
            per_cell[cell] = run_finetune_cell(
                cell, p.runs[cell.run].finetune, p.task, p.test_examples(), out_dir, p.experiment.root, tracker
            )
    if not is_main_process():
        return False
    models = [
        (model, prompted)
        for model, cells in by_model.items()
        if (prompted := [c for c in cells if p.runs[c.run].prompt])
    ]
    for k, (model, prompted) in enumerate(models):
        with frozen_load(lambda m=model: lm or _load(m)) as model_lm:
            _run_prompted(model_lm, prompted, p, out_dir, progress, tracker, per_cell)
        del model_lm  # one model in memory at a time:
        if k + 1 < len(models):
            gc.collect()  # its reference cycles freed before the next one loads (with the collector paused)
    return True


def _record_finished(out_dir: Path, cells: list[Cell], per_cell: dict[Cell, dict]) -> None:
    """After a failure, make results.json describe the folders beside it. A cell's predictions
    are replaced once it has predicted every example (its manifest follows the metrics), so a
    run whose every cell (every seed) finished now is written in; a run some of whose cells
    were replaced but not all (a later seed failed, or the failure came while its metrics were
    computed) is dropped, as is a spread over templates or demonstration sets that such a run
    belongs to; the runs the failure did not reach stay as they were."""
    replaced = {c.label for c in cells if c in per_cell or _unfinished(out_dir / c.folder)}
    if not replaced:
        return
    finished = {label for label in replaced if all(c in per_cell for c in cells if c.label == label)}
    members: dict[str, set[str]] = {}
    for cell in cells:
        if (key := _spread_key(cell)) is not None:
            members.setdefault(key, set()).add(cell.label)
    new = _results([c for c in cells if c.label in finished], per_cell)
    new = {k: v for k, v in new.items() if members.get(k, finished) <= finished}
    gone = (replaced - finished) | {k for k, labels in members.items() if labels & replaced and not labels <= finished}
    try:
        old = read_results(out_dir / "results.json")
        merged = {k: new.get(k, v) for k, v in old.items() if k not in gone}  # in their places
        merged.update({k: v for k, v in new.items() if k not in merged})
        atomic_write(out_dir / "results.json", json.dumps(merged, indent=2))
    except (TaskfitError, OSError) as exc:  # the failure being raised is what the user must see
        log.warning("%s: could not record the runs that finished (%s)", out_dir / "results.json", exc)


def _unfinished(folder: Path) -> bool:
    """Whether a cell folder holds predictions without their manifest (replaced, not finished)."""
    return (folder / "predictions.jsonl").exists() and not (folder / "manifest.json").exists()


def _run_prompted(lm: LM, cells: list[Cell], p: Plan, out_dir: Path, progress, tracker, out: dict) -> None:
    """Run one model's prompted cells, through its score cache in `out_dir`, into `out` as each
    finishes."""
    cached = CachedLM(lm, ScoreCache.for_model(out_dir, lm.identity))
    try:
        with cached.session():
            for cell in cells:
                prompt = p.runs[cell.run].prompt
                out[cell] = run_cell(
                    cell, prompt, p.task, p.test_examples(), cached, out_dir, p.experiment.root, progress, tracker
                )
    finally:
        cached.cache.close()


def _tracker(cfg, out_dir: Path):
    if cfg.tracking != "mlflow":
        return None
    from taskfit.tracking import MlflowTracker

    return MlflowTracker(cfg.name, out_dir, cfg.tracking_uri)


def _load(model: ModelConfig) -> LM:
    from taskfit.models import load_model

    return load_model(model)


def _by_model(cells: list[Cell]) -> dict[ModelConfig, list[Cell]]:
    groups: dict[ModelConfig, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.model, []).append(cell)
    return groups


def _results(cells: list[Cell], per_cell: dict[Cell, dict]) -> dict[str, Any]:
    """Per label: metrics (aggregated over seeds). Per run with templates (`combine: each`) or
    demonstration sets: their spread too, for each number of shots or training examples apart
    (those are settings, the x of a learning curve; averaging over them would mean nothing)."""
    by_label: dict[str, dict[int, dict]] = {}
    for cell in cells:
        by_label.setdefault(cell.label, {})[cell.seed] = per_cell[cell]
    results = {label: aggregate_seeds(seeds) for label, seeds in by_label.items()}
    variants: dict[str, list[str]] = {}
    for cell in cells:
        if (key := _spread_key(cell)) is not None:
            variants.setdefault(key, [])
            if cell.label not in variants[key]:
                variants[key].append(cell.label)
    for key, labels in variants.items():
        results[key] = spread({label: results[label] for label in labels})
    return results


def _spread_key(cell: Cell) -> str | None:
    """The results.json key of the spread a cell belongs to: its run (with its number of shots,
    and @model), where it is one of several templates or demonstration sets; else None."""
    if cell.template is None and cell.demo_set is None:
        return None
    setting = f"k{cell.shots}" if cell.shots is not None else ""
    model = cell.label[cell.label.index("]") + 1 :]  # @model, if any
    return (f"{cell.run}[{setting}]" if setting else cell.run) + model
