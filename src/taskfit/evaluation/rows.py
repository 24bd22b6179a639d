"""Metrics of a cell from its prediction rows, by task type and by what the rows carry.

Rows stream past `MetricInputs` one chunk at a time (they go to disk, not into memory):
it keeps only what the metrics need, as compact arrays for choice tasks (gold and predicted
option, confidence, correctness), so a run's memory does not grow with its prompts, scores
and generations. Generation and token classification keep their predicted and reference
texts or tags, which corpus-level metrics (BLEU, chrF, seqeval) need whole.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np

from taskfit.evaluation.metrics import bootstrap_ci, compute_metrics, corpus_metric, mean_score
from taskfit.evaluation.statistics import expected_calibration_error
from taskfit.tasks import Task

RATES = ("extraction_failed", "vote_agreement", "parse_failed")
"""Per-row figures reported as their mean when every row has them."""


class MetricInputs:
    """What the metrics of one cell need from its rows, accumulated chunk by chunk."""

    def __init__(self, task: Task):
        self.task = task
        self.n = 0
        self.gold, self.pred = array("q"), array("q")  # choice tasks: option indices
        self.correct, self.confidence = array("b"), array("d")
        self.with_probabilities = 0
        self.n_options = 0
        self.labels: list[Any] = []  # generation: references; token classification: gold tags
        self.predictions: list[Any] = []
        self.rates = {name: [0, 0.0] for name in RATES}  # rows that have it, their sum
        self._index = {label: i for i, label in enumerate(task.labels or [])}

    def add(self, rows: Iterable[dict[str, Any]]) -> MetricInputs:
        for row in rows:
            self.n += 1
            if self.task.type == "generation":
                self.predictions.append(row["prediction"])
                self.labels.append(row["references"])
            elif self.task.type == "token_classification":
                self.predictions.append(row["prediction"])
                self.labels.append(row["label"])
            else:
                self._add_choice(row)
            for name, acc in self.rates.items():
                if name in row:
                    acc[0] += 1
                    acc[1] += float(row[name])
        return self

    def _add_choice(self, row: dict[str, Any]) -> None:
        if self.task.type == "classification":
            self.gold.append(self._index[row["label"]])
            self.pred.append(self._index[row["prediction"]])
        else:
            self.gold.append(row["label"])
            self.pred.append(row["prediction"])
        self.correct.append(bool(row["correct"]))
        if "probabilities" in row:
            self.with_probabilities += 1
            self.confidence.append(max(row["probabilities"]))
            self.n_options = max(self.n_options, len(row["probabilities"]))

    def metrics(self, seed: int) -> dict[str, Any]:
        if self.task.type == "generation":
            out = _generation_metrics(self.predictions, self.labels, seed)
        elif self.task.type == "token_classification":
            from taskfit.evaluation.token_metrics import token_metrics

            out = token_metrics(self.labels, self.predictions, seed=seed)
        else:
            out = self._choice_metrics(seed)
        for name, (count, total) in self.rates.items():
            if self.n and count == self.n:
                out[name] = total / self.n
        return out

    def _choice_metrics(self, seed: int) -> dict[str, Any]:
        if self.task.type == "classification":
            n_classes = len(self.task.labels)
        else:
            n_classes = self.n_options if self.n and self.with_probabilities == self.n else 2
        out = compute_metrics(self.task.metrics, np.asarray(self.gold), np.asarray(self.pred), n_classes, seed=seed)
        if self.n and self.with_probabilities == self.n:
            # ECE of the label probabilities: a confidence that can be checked against correctness.
            out["ece"] = expected_calibration_error(np.asarray(self.confidence), np.asarray(self.correct, dtype=bool))
        return out


def _generation_metrics(preds: list[str], refs: list[list[str]], seed: int) -> dict[str, Any]:
    from taskfit.evaluation import text_metrics as tm

    out: dict[str, Any] = {"n": len(preds)}
    for name, fn in (("exact_match", tm.exact_match), ("token_f1", tm.token_f1), ("rouge_l", tm.rouge_l)):
        values = np.asarray(fn(preds, refs), dtype=float)
        out[name] = float(values.mean())
        out[f"{name}_ci95"] = list(bootstrap_ci(mean_score, np.zeros(len(values)), values, 0, seed=seed))
    for name in ("bleu", "chrf"):  # corpus-level: the bootstrap resamples the examples' n-gram counts
        stats, score = tm.corpus_statistics(name, preds, refs)
        out[name] = score(stats.sum(axis=0))
        metric, every = corpus_metric(stats, score), np.arange(len(stats))
        out[f"{name}_ci95"] = list(bootstrap_ci(metric, np.zeros(len(stats)), every, 0, seed=seed))
    return out
