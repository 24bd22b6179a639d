"""The report's plots, each returned as PNG bytes.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas directly:
no pyplot, so no global figure registry, no GUI backend and no change to the backend of
a caller (a notebook keeps its own). Each figure is cleared once saved.
"""

from __future__ import annotations

import math
from io import BytesIO
from typing import Any

import numpy as np

from taskfit.report.analysis import Series

DPI = 100


def _figure(width: float, height: float, **subplots: Any):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots)


def _png(fig) -> bytes:
    buffer = BytesIO()
    try:
        fig.savefig(buffer, format="png", metadata={"Software": None})
    finally:
        fig.clear()
    return buffer.getvalue()


def palette(labels: list[str]) -> dict[str, Any]:
    """A fixed colour per label, the same in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def metric_bars(labels: list[str], values: list[float], errors: list[tuple[float, float]], metric: str) -> bytes:
    """Horizontal bars (long run names stay readable), one per label, with error bars."""
    fig, ax = _figure(7, 1.2 + 0.45 * len(labels))
    y = np.arange(len(labels))
    err = np.array(errors, dtype=float).T  # (2, L): below, above
    colors = list(palette(labels).values())
    ax.barh(y, values, xerr=err, color=colors, capsize=4, error_kw={"elinewidth": 1})
    for yi, v, hi in zip(y, values, err[1]):
        ax.text(min(v + hi + 0.01, 1.0), yi, f"{v:.3f}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(metric)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def confusion_heatmap(matrix: np.ndarray, class_names: list[str], title: str) -> bytes:
    k = len(class_names)
    side = min(12.0, 2.5 + 0.55 * k)
    fig, ax = _figure(side + 1.2, side)
    image = ax.imshow(matrix, cmap="Blues", vmin=0)  # from 0, so the text colour threshold matches
    fig.colorbar(image, ax=ax, shrink=0.8, label="examples")
    ax.set_xticks(range(k), class_names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    if k <= 15:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    return _png(fig)


def reliability_grid(panels: list[tuple[str, dict[str, Any]]]) -> bytes:
    """Small multiples with shared axes, one per label: accuracy per confidence bin against the
    diagonal of perfect calibration. panels: (label, analysis.calibration(...))."""
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = _figure(
        3.0 * cols + 0.4, 3.0 * rows + 0.4, nrows=rows, ncols=cols, sharex=True, sharey=True, squeeze=False
    )
    for ax, (label, cal) in zip(axes.flat, panels):
        _reliability_panel(ax, label, cal)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("confidence of the prediction")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    return _png(fig)


def _reliability_panel(ax, label: str, cal: dict[str, Any]) -> None:
    bins = [b for b in cal["bins"] if b["count"]]
    width = cal["bins"][0]["upper"] - cal["bins"][0]["lower"]
    lower, accuracy = [b["lower"] for b in bins], [b["accuracy"] for b in bins]
    ax.bar(lower, accuracy, width=width, align="edge", color="#4c72b0", edgecolor="white", label="accuracy")
    ax.plot([b["confidence"] for b in bins], accuracy, "o", color="#dd8452", ms=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_title(f"{label}\nECE {cal['ece']:.3f} (n={cal['n']})", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def learning_curve(series: list[Series], metric: str) -> bytes:
    from matplotlib.ticker import MaxNLocator

    kinds = {s.kind for s in series}
    fig, ax = _figure(7, 4.2)
    for s in series:
        x, v, lo, hi = (np.array(col, dtype=float) for col in zip(*s.points))
        style = "o-" if s.kind == "shots" else "s--"
        ax.errorbar(x, v, yerr=np.vstack([lo, hi]), fmt=style, capsize=3, label=s.name)
    if kinds == {"shots", "train_size"}:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("demonstrations (prompting, o) · training examples (fine-tuning, □)")
    else:
        ax.set_xlabel("demonstrations in the prompt" if "shots" in kinds else "training examples")
    if kinds == {"shots"}:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def cost_scatter(panels: list[tuple[str, list[float], list[float], list[str]]], metric: str, order: list[str]) -> bytes:
    """One scatter per cost: (x label, x values, metric values, labels), a point per cell."""
    fig, axes = _figure(4.2 * len(panels) + 1.8, 3.8, ncols=len(panels), sharey=True, squeeze=False)
    colors = palette(order)
    for ax, (xlabel, xs, ys, labels) in zip(axes[0], panels):
        for label in dict.fromkeys(labels):
            pts = [(x, y) for x, y, lab in zip(xs, ys, labels) if lab == label]
            ax.scatter(*zip(*pts), color=colors[label], label=label, s=28, alpha=0.85)
        _spread_scale(ax, xs)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8)
    return _png(fig)


def _spread_scale(ax, xs: list[float]) -> None:
    """A log axis for costs spanning orders of magnitude (symlog when some are 0, e.g. the
    trainable parameters of prompting cells next to fine-tuned ones)."""
    positive = [x for x in xs if x > 0]
    if not positive or max(positive) / min(positive) <= 100:
        return
    if len(positive) < len(xs):
        ax.set_xscale("symlog", linthresh=min(positive))
    else:
        ax.set_xscale("log")


def seed_boxes(labels: list[str], values: list[list[float]], metric: str) -> bytes:
    """Spread of the metric across seeds: a box per label, with every seed as a dot."""
    fig, ax = _figure(max(5.0, 1.0 + 0.8 * len(labels)), 4.2)
    positions = np.arange(1, len(labels) + 1)
    ax.boxplot(values, positions=positions, widths=0.5, showfliers=False)
    colors = palette(labels)
    for pos, label, vals in zip(positions, labels, values):
        ax.scatter([pos] * len(vals), vals, color=colors[label], s=18, zorder=3)
    rotate = len(labels) > 4
    ax.set_xticks(positions, labels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel(f"{metric} per seed")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
