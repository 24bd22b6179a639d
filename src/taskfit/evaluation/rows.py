"""Metrics of a cell from its prediction rows, by task type and by what the rows carry."""

from __future__ import annotations

from statistics import fmean
from typing import Any

import numpy as np

from taskfit.evaluation.metrics import bootstrap_ci, compute_metrics, mean_score
from taskfit.evaluation.statistics import expected_calibration_error
from taskfit.tasks import Task


def row_metrics(task: Task, rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    if task.type == "generation":
        out = _generation_metrics(rows, seed)
    elif task.type == "token_classification":
        from taskfit.evaluation.token_metrics import token_metrics

        out = token_metrics([r["label"] for r in rows], [r["prediction"] for r in rows], seed=seed)
    else:
        out = _choice_metrics(task, rows, seed)
        if all("probabilities" in r for r in rows):
            # ECE of the label probabilities: a confidence that can be checked against correctness.
            out["ece"] = expected_calibration_error([r["probabilities"] for r in rows], [r["correct"] for r in rows])
    for name in ("extraction_failed", "vote_agreement", "parse_failed"):
        if rows and all(name in r for r in rows):
            out[name] = fmean(r[name] for r in rows)
    return out


def _choice_metrics(task: Task, rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    if task.type == "classification":
        index = {label: i for i, label in enumerate(task.labels)}
        gold = [index[r["label"]] for r in rows]
        pred = [index[r["prediction"]] for r in rows]
        n_classes = len(task.labels)
    else:
        gold = [r["label"] for r in rows]
        pred = [r["prediction"] for r in rows]
        n_classes = max(len(r["probabilities"]) for r in rows) if rows and "probabilities" in rows[0] else 2
    return compute_metrics(task.metrics, gold, pred, n_classes, seed=seed)


def _generation_metrics(rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    from taskfit.evaluation import text_metrics as tm

    preds = [r["prediction"] for r in rows]
    refs = [r["references"] for r in rows]
    out: dict[str, Any] = {"n": len(rows)}
    for name, fn in (("exact_match", tm.exact_match), ("token_f1", tm.token_f1), ("rouge_l", tm.rouge_l)):
        values = np.asarray(fn(preds, refs), dtype=float)
        out[name] = float(values.mean())
        out[f"{name}_ci95"] = list(bootstrap_ci(mean_score, np.zeros(len(values)), values, 0, seed=seed))
    out["bleu"] = tm.bleu(preds, refs)
    out["chrf"] = tm.chrf(preds, refs)
    return out
