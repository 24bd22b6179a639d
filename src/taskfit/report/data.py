"""Gathering what a report shows from an experiment folder written by `taskfit run`:
its cells (manifest + predictions), results.json, config.yaml and comparison.json."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from taskfit.errors import TaskfitError
from taskfit.evaluation.aggregate import aggregate_seeds
from taskfit.rundir import CellResult, load_cells

log = logging.getLogger(__name__)


@dataclass
class LabelGroup:
    """One row of results.json: a run (or run@model), with its cells at every seed."""

    label: str
    result: dict[str, Any]
    cells: list[CellResult]
    """Sorted by seed; empty when results.json names a label whose folders are gone."""

    @property
    def first(self) -> CellResult | None:
        """The cell of the lowest seed: per-example sections show this one."""
        return self.cells[0] if self.cells else None

    @property
    def seeds(self) -> list[int]:
        return [c.seed for c in self.cells]


@dataclass
class ReportData:
    folder: Path
    name: str
    task_type: str | None
    class_names: list[str]
    groups: list[LabelGroup]
    comparisons: list[dict[str, Any]]
    comparison_note: str
    """Why there are no comparisons, when there are none."""
    finished: datetime | None
    """When the newest cell was written."""

    @property
    def cells(self) -> list[CellResult]:
        return [c for g in self.groups for c in g.cells]


def gather(folder: Path) -> ReportData:
    folder = Path(folder)
    cells = load_cells([folder])
    results = _read_json(folder / "results.json") or {}
    groups = _groups(cells, results)
    first = cells[0].manifest
    task = first.get("task", {})
    comparisons, note = _comparisons(folder, cells)
    return ReportData(
        folder=folder,
        name=_experiment_name(folder),
        task_type=task.get("type"),
        class_names=list(task.get("labels") or []),
        groups=groups,
        comparisons=comparisons,
        comparison_note=note,
        finished=_finished(cells),
    )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskfitError(f"{path}: not valid JSON ({exc}). Re-run `taskfit run` to rewrite it.") from exc


def _experiment_name(folder: Path) -> str:
    path = folder / "config.yaml"
    if path.is_file():
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            config = None
        if isinstance(config, dict) and config.get("name"):
            return str(config["name"])
    return folder.resolve().name


def _groups(cells: list[CellResult], results: dict[str, Any]) -> list[LabelGroup]:
    """One group per label: results.json's order first, then labels only the cells know."""
    by_label: dict[str, list[CellResult]] = {}
    for cell in cells:
        by_label.setdefault(cell.label, []).append(cell)
    labels = list(results) + [label for label in by_label if label not in results]
    groups = []
    for label in labels:
        members = sorted(by_label.get(label, []), key=lambda c: c.seed)
        result = results.get(label) or (aggregate_seeds({c.seed: c.metrics for c in members}) if members else {})
        groups.append(LabelGroup(label, result, members))
    return groups


def _finished(cells: list[CellResult]) -> datetime | None:
    times = [(c.folder / "manifest.json").stat().st_mtime for c in cells]
    return datetime.fromtimestamp(max(times)).astimezone() if times else None


def _comparisons(folder: Path, cells: list[CellResult]) -> tuple[list[dict[str, Any]], str]:
    """comparison.json's rows while they were computed from these very cells (`taskfit compare`
    records their predictions' hashes), else computed afresh: a run written again since, or a
    comparison of other cells, must not show its old numbers."""
    stored = _read_json(folder / "comparison.json")
    if len({c.label for c in cells}) < 2:
        return [], "Only one run: nothing to compare."
    try:
        from taskfit.compare import compare_cells, fingerprints
    except ImportError:
        return [], "No comparison.json, and this taskfit cannot compute comparisons."
    if isinstance(stored, dict) and stored.get("cells") == fingerprints(cells):
        return _as_rows(stored), ""
    seed = stored.get("seed") if isinstance(stored, dict) and isinstance(stored.get("seed"), int) else 0
    try:
        return _as_rows(compare_cells(cells, seed=max(seed, 0))), ""
    except TaskfitError as exc:
        log.warning("report: comparisons skipped: %s", exc)
        return [], f"Comparisons could not be computed: {exc}"


def _as_rows(comparisons: Any) -> list[dict[str, Any]]:
    """comparison.json's content, or what `compare_cells` returns (the same dict, or its list)."""
    if isinstance(comparisons, dict):
        comparisons = comparisons.get("comparisons", [])
    rows = []
    for row in comparisons or []:
        rows.append(dataclasses.asdict(row) if dataclasses.is_dataclass(row) else dict(row))
    return rows
