"""The accuracy-vs-cost section: wall time, peak memory and trainable parameters per cell."""

from __future__ import annotations

import statistics

from taskfit.report import analysis, plots
from taskfit.report.blocks import Figure, Section, Table, Text
from taskfit.report.data import ReportData
from taskfit.report.formatting import DASH, num

DOTS = "Each dot is one cell (run × seed)."
CACHE = "A cell answered from the score cache (few requests computed) took less time than it would cost afresh."
MEMORY = "Peak memory is the peak resident memory of the process (or GPU memory allocated, when every cell used a GPU)"
RESTARTS = (
    "the peak restarts when a cell starts, so it counts what stays loaded (such as the model) "
    "but not the peaks of earlier cells"
)
ACCUMULATES = "cells run one after another in one process, so a later cell's peak includes earlier ones"


def memory_note(manifests: list[dict]) -> str:
    """What the peak memory numbers mean, as the manifests' `cpu_rss_scope` says: `cell` (the peak
    within the cell alone) or `process` (the process's peak so far; also manifests without the key)."""
    scopes = [(m.get("peak_memory_mb") or {}).get("cpu_rss_scope") for m in manifests]
    per_cell = sum(s == "cell" for s in scopes)
    if per_cell == len(scopes):
        return f"{MEMORY}, measured within each cell: {RESTARTS}."
    if per_cell == 0:
        return f"{MEMORY} when the cell finished: {ACCUMULATES}."
    return (
        f"{MEMORY}. For {per_cell} of {len(scopes)} cells it is measured within the cell: {RESTARTS}. "
        f"For the others it is the peak when the cell finished: {ACCUMULATES}."
    )


def caveat(manifests: list[dict]) -> str:
    return f"{DOTS} {memory_note(manifests)} {CACHE}"


def _numbers(points: list[dict], key: str) -> list[float] | None:
    values = [p.get(key) for p in points]
    if not all(isinstance(v, int | float) for v in values):
        return None
    return [float(v) for v in values]


def cost_panels(points: list[dict]) -> list[tuple[str, list[float], list[float], list[str]]]:
    labels = [p["label"] for p in points]
    ys = [p["value"] for p in points]
    panels = []
    wall = _numbers(points, "wall_time_s")
    if wall is not None:
        panels.append(("wall time (s)", wall, ys, labels))
    gpu, cpu = _numbers(points, "gpu_allocated"), _numbers(points, "cpu_rss")
    if gpu is not None:
        panels.append(("peak GPU memory allocated (MB)", gpu, ys, labels))
    elif cpu is not None:
        panels.append(("peak resident memory (MB)", cpu, ys, labels))
    trainable = _numbers(points, "trainable")
    if trainable is not None and any(trainable):
        panels.append(("trainable parameters", trainable, ys, labels))
    return panels


COLUMNS = [
    "run",
    "wall time per seed (s)",
    "examples/s",
    "peak RSS (MB)",
    "trainable parameters",
    "requests computed",
    "training per seed (s)",
    "training tokens/s",
]


def cost_table(data: ReportData, metric: str) -> Table:
    rows = [_cost_row(g.cells) + _training_row(g.cells) + [num(g.result.get(metric))] for g in data.groups if g.cells]
    return Table([*COLUMNS, metric], rows, "cost", numeric=[False] + [True] * (len(COLUMNS)))


def _training_row(cells: list) -> list[str]:
    """A fine-tuning run's training time and throughput (as its manifests' `finetune` record them)."""
    stats = [c.manifest.get("finetune") or {} for c in cells]
    times = [s["train_time_s"] for s in stats if isinstance(s.get("train_time_s"), int | float)]
    speeds = [s["train_tokens_per_s"] for s in stats if isinstance(s.get("train_tokens_per_s"), int | float)]
    return [
        num(statistics.fmean(times), 1) if times else DASH,
        f"{statistics.fmean(speeds):,.0f}" if speeds else DASH,
    ]


def _cost_row(cells: list) -> list[str]:
    manifests = [c.manifest for c in cells]
    times = [m["wall_time_s"] for m in manifests if isinstance(m.get("wall_time_s"), int | float)]
    examples = sum(m.get("examples") or 0 for m in manifests)
    memory = max((m.get("peak_memory_mb") or {}).get("cpu_rss") or 0 for m in manifests)
    computed = [m["requests_computed"] for m in manifests if isinstance(m.get("requests_computed"), int)]
    return [
        cells[0].label,
        num(statistics.fmean(times), 2) if times else DASH,
        num(examples / sum(times), 1) if times and sum(times) > 0 else DASH,
        num(memory, 0),
        f"{max(m.get('trainable_parameters') or 0 for m in manifests):,}",
        str(sum(computed)) if computed else DASH,
    ]


def cost_section(data: ReportData, metric: str) -> Section | None:
    points = analysis.cost_points(data.groups, metric)
    if not points:
        return None
    blocks: list = [Text(caveat([c.manifest for c in data.cells]))]
    panels = cost_panels(points)
    if panels:
        order = [g.label for g in data.groups]
        png = plots.cost_scatter(panels, metric, order)
        blocks.append(Figure("cost", f"{metric} vs cost", png))
    blocks.append(cost_table(data, metric))
    return Section("cost", f"{metric.replace('_', ' ').capitalize()} vs cost", blocks)
