"""Numbers the report derives from predictions and manifests. Pure functions, no plotting."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from taskfit.evaluation.statistics import expected_calibration_error, option_probabilities, reliability_bins
from taskfit.report.data import LabelGroup

PROMPT_CHARS = 1500
"""Prompts longer than this are shown by their last characters: the end is where the example is."""


def natural_key(value: Any) -> tuple:
    """Sort key for ids so that 'c2' comes before 'c10'."""
    parts = re.split(r"(\d+)", str(value))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def option_index(value: Any, class_names: list[str]) -> int | None:
    """A gold or predicted answer as an option index: classification rows hold label names,
    multiple-choice rows hold indices."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return class_names.index(value)
    except ValueError:
        return None


def gold_and_pred(rows: list[dict], class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N,), (N,) integer arrays over the rows whose gold and prediction both map to a class."""
    pairs = [(option_index(r.get("label"), class_names), option_index(r.get("prediction"), class_names)) for r in rows]
    k = len(class_names)
    pairs = [(g, p) for g, p in pairs if g is not None and p is not None and 0 <= g < k and 0 <= p < k]
    gold = np.array([g for g, _ in pairs], dtype=int)
    pred = np.array([p for _, p in pairs], dtype=int)
    return gold, pred


def confusion_matrix(gold: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) counts: rows are the gold class, columns the predicted one."""
    flat = np.bincount(gold * n_classes + pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def per_class(matrix: np.ndarray) -> list[dict[str, float]]:
    """Precision, recall, F1 and support per class of a confusion matrix (0 where undefined)."""
    out = []
    for c in range(len(matrix)):
        tp, predicted, support = matrix[c, c], matrix[:, c].sum(), matrix[c, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support)})
    return out


def option_probs(row: dict) -> list[float] | None:
    """A row's option probabilities: its `probabilities` (vote shares, chain-of-thought rows),
    else the softmax of its `scores` (option log-likelihoods); None when it has neither."""
    probs = row.get("probabilities")
    if isinstance(probs, list) and probs and all(isinstance(p, int | float) and 0 <= p <= 1 for p in probs):
        return [float(p) for p in probs]
    try:
        return option_probabilities(row.get("scores") or [])
    except (TypeError, ValueError):
        return None


def prediction_confidence(row: dict, class_names: list[str]) -> float | None:
    """The model's probability of the option it predicted; None without usable probabilities."""
    index = option_index(row.get("prediction"), class_names)
    probs = option_probs(row)
    if probs is None or index is None or not 0 <= index < len(probs):
        return None
    return probs[index]


def calibration(rows: list[dict], class_names: list[str], n_bins: int = 10) -> dict[str, Any] | None:
    """Reliability bins and ECE of the predicted option's probability, or None without scores.

    The confidence is the probability of the *predicted* option, which is what `correct` is
    about; with length-normalized ranking that need not be the most probable option."""
    conf, hit = [], []
    for row in rows:
        p = prediction_confidence(row, class_names)
        if p is not None:
            conf.append(p)
            hit.append(bool(row.get("correct")))
    if not conf:
        return None
    return {
        "bins": reliability_bins(conf, hit, n_bins),
        "ece": expected_calibration_error(conf, hit, n_bins),
        "n": len(conf),
    }


def wrong_predictions(rows: list[dict], limit: int = 5) -> list[dict]:
    """The first `limit` wrong rows in id order (natural order, so the choice is stable).
    Rows that do not say whether they are correct (free-text generation) are not counted."""
    wrong = [r for r in rows if r.get("correct") is False]
    return sorted(wrong, key=lambda r: natural_key(r.get("id")))[:limit]


def truncate_prompt(text: str, limit: int = PROMPT_CHARS) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def metric_error(result: dict[str, Any], metric: str) -> tuple[float, float, float, str] | None:
    """(value, error below, error above, kind): the std across seeds when there are several,
    else the 95% interval; None when the result lacks the metric."""
    value = result.get(metric)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    std = result.get(f"{metric}_std")
    if isinstance(std, int | float):
        return float(value), float(std), float(std), "std"
    ci = result.get(f"{metric}_ci95")
    if isinstance(ci, list | tuple) and len(ci) == 2:
        return float(value), max(0.0, value - ci[0]), max(0.0, ci[1] - value), "ci"
    return float(value), 0.0, 0.0, ""


def per_seed_values(group: LabelGroup, metric: str) -> list[float]:
    values = [c.metrics.get(metric) for c in group.cells]
    if not values:
        values = [m.get(metric) for m in group.result.get("per_seed", {}).values()]
    return [float(v) for v in values if isinstance(v, int | float)]


@dataclass
class Series:
    """Labels that differ only in the x variable (shots, or training examples), as one curve."""

    name: str
    kind: str
    """`shots` or `train_size`."""
    points: list[tuple[float, float, float, float]] = field(default_factory=list)
    """(x, value, error below, error above), sorted by x."""


def curve_x(manifest: dict[str, Any]) -> tuple[str, float] | None:
    """Where a cell sits on the learning curve: training examples for a fine-tuning cell,
    demonstrations for a prompting one."""
    if manifest.get("finetune") is not None and manifest.get("train_size") is not None:
        examples = manifest.get("train_examples", manifest["train_size"])  # what `all` came to, too
        return ("train_size", float(examples)) if isinstance(examples, int | float) else None
    prompt = (manifest.get("config") or {}).get("prompt")
    shots = prompt.get("shots") if isinstance(prompt, dict) else None
    return ("shots", float(shots)) if isinstance(shots, int | float) else None


def _series_key(manifest: dict[str, Any], kind: str) -> str:
    """What a cell's curve is made of: everything but its x. A run's variants (`combine: each`
    templates, `demo_sets` draws) share the run's settings, so the manifest's `template` and
    `demo_set` keep each on a curve of its own."""
    model = manifest.get("model") or {}
    if kind == "train_size":
        finetune = (manifest.get("config") or {}).get("finetune") or {}  # the settings (not the training's figures)
        settings = {k: v for k, v in finetune.items() if k != "train_sizes"}
    else:
        prompt = (manifest.get("config") or {}).get("prompt") or {}
        settings = {k: v for k, v in prompt.items() if k not in ("shots", "demos")}
    variant = [manifest.get("template"), manifest.get("demo_set")]
    return json.dumps([kind, model.get("name"), model.get("dtype"), settings, variant], sort_keys=True, default=str)


def learning_series(groups: list[LabelGroup], metric: str) -> list[Series]:
    """One series per setting; empty unless the points span at least two x values."""
    series: dict[str, tuple[Series, list[str]]] = {}
    for group in groups:
        position = curve_x(group.first.manifest) if group.first else None
        point = metric_error(group.result, metric)
        if position is None or point is None:
            continue
        kind, x = position
        entry = series.setdefault(_series_key(group.first.manifest, kind), (Series("", kind), []))
        entry[0].points.append((x, *point[:3]))
        entry[1].append(group.label)
    if len({p[0] for s, _ in series.values() for p in s.points}) < 2:
        return []
    for s, labels in series.values():
        s.points.sort()
        s.name = ", ".join(labels) if len(labels) <= 4 else f"{', '.join(labels[:3])}, … ({len(labels)} runs)"
    return [s for s, _ in series.values()]


def cost_points(groups: list[LabelGroup], metric: str) -> list[dict[str, Any]]:
    """Per cell: its label, metric value and costs (wall time, peak memory, trainable parameters)."""
    out = []
    for group in groups:
        for cell in group.cells:
            value = cell.metrics.get(metric)
            if not isinstance(value, int | float):
                continue
            memory = cell.manifest.get("peak_memory_mb") or {}
            out.append(
                {
                    "label": group.label,
                    "value": float(value),
                    "wall_time_s": cell.manifest.get("wall_time_s"),
                    "cpu_rss": memory.get("cpu_rss"),
                    "gpu_allocated": memory.get("gpu_allocated"),
                    "trainable": cell.manifest.get("trainable_parameters") or 0,
                    "examples": cell.manifest.get("examples"),
                }
            )
    return out
