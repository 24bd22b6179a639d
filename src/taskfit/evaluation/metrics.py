"""Metrics on predictions, each with a seeded percentile-bootstrap 95% interval.

Metric functions take integer arrays of gold and predicted option indices; classification
metrics also know the number of classes. The bootstrap resamples examples (rows), with
resamples computed in vectorized blocks of bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

BLOCK_ELEMENTS = 1 << 20
"""Resampled index arrays are drawn in blocks of at most this many elements, so memory stays
bounded (~8 MB per int64 array) however many items there are (R x N for N=100k is 800 MB).
Drawn in sequence, the blocks hold the same numbers as one (R, N) draw."""


def resample_blocks(resamples: int, n: int) -> Iterator[int]:
    """Numbers of resamples per block: together `resamples`, each block at most ~BLOCK_ELEMENTS."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, resamples, step):
        yield min(step, resamples - start)


def accuracy(gold: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """gold, pred: (..., N) -> (...)"""
    return (gold == pred).mean(axis=-1)


def macro_f1(gold: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Unweighted mean of per-class F1 over all classes of the label space (sklearn's
    `f1_score(average="macro", labels=range(n_classes), zero_division=0)`)."""
    scores = []
    for c in range(n_classes):
        tp = ((gold == c) & (pred == c)).sum(axis=-1)
        denom = (gold == c).sum(axis=-1) + (pred == c).sum(axis=-1)
        scores.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.mean(scores, axis=0)


def mean_score(gold: np.ndarray, scores: np.ndarray, n_classes: int) -> np.ndarray:
    """The mean of per-example scores passed in the prediction slot (gold unused), so that
    per-example metrics (exact match, token F1, ...) reuse the bootstrap and paired tests."""
    return scores.mean(axis=-1)


def corpus_metric(stats: np.ndarray, score: Callable[[np.ndarray], float]) -> Metric:
    """A corpus-level metric (BLEU, chrF) as a `Metric` over example indices passed in the
    prediction slot (gold unused): per row of indices, `score` of the summed statistics
    `stats` (examples, k) of the examples it draws. Indices into one array of two systems'
    statistics (the second's after the first's) make the paired tests' swaps exact."""

    def metric(gold: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
        idx = np.asarray(idx)
        rows = idx.reshape(-1, idx.shape[-1])
        # how often each example is drawn, times its counts: one matrix product per block
        # (whole-number counts, so the sums are exact in float64 in any order)
        drawn = np.stack([np.bincount(row, minlength=len(stats)) for row in rows]).astype(float)
        values = [score(summed) for summed in drawn @ stats]
        return np.asarray(values, dtype=float).reshape(idx.shape[:-1])

    return metric


METRICS: dict[str, Metric] = {"accuracy": accuracy, "macro_f1": macro_f1}


def bootstrap_ci(
    metric: Metric, gold: np.ndarray, pred: np.ndarray, n_classes: int, *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% interval of `metric` over `resamples` resamples of the examples."""
    rng = np.random.default_rng(seed)
    values = []
    for size in resample_blocks(resamples, len(gold)):
        idx = rng.integers(0, len(gold), size=(size, len(gold)))  # (B, N)
        values.append(metric(gold[idx], pred[idx], n_classes))
    low, high = np.percentile(np.concatenate(values), [2.5, 97.5])
    return float(low), float(high)


def compute_metrics(names: tuple[str, ...], gold: list[int], pred: list[int], n_classes: int, seed: int = 0) -> dict:
    g, p = np.asarray(gold), np.asarray(pred)
    out: dict[str, object] = {"n": len(g)}
    for name in names:
        fn = METRICS[name]
        out[name] = float(fn(g, p, n_classes))
        out[f"{name}_ci95"] = list(bootstrap_ci(fn, g, p, n_classes, seed=seed))
    return out
