"""Token classification metrics: entity-level micro precision, recall and F1 (seqeval) and
token accuracy, each with a seeded percentile-bootstrap 95% interval over sentences.

Entities are decoded with seqeval's default mode, the conlleval convention that CoNLL
scores are reported with, rather than its strict IOB2 mode: it reads BIO, IOBES and IO
(plain tags are passed as `I-<tag>`) alike, and an ill-formed sequence such as `O I-PER`
still yields an entity instead of silently losing it. An entity counts as found only when
its type and both boundaries match.

The bootstrap resamples sentences: each sentence's true positives, false positives, false
negatives, correct tokens and tokens are counted once, and every resample sums the counts of
its drawn sentences. That is exactly what seqeval would compute on the resampled sentences,
because entities never cross a sentence boundary, but costs one sum per resample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from taskfit.tasks.token_classification import for_seqeval, spans

_BLOCK = 100
"""Resamples drawn per block, so memory stays (100, N) whatever the test size."""


def sentence_counts(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> np.ndarray:
    """(N, 5) integer counts per sentence: TP, FP, FN entities, correct tokens, tokens."""
    out = np.zeros((len(gold), 5), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(g)} gold tags")
        gold_spans, pred_spans = set(spans(g)), set(spans(p))
        tp = len(gold_spans & pred_spans)
        correct = sum(a == b for a, b in zip(g, p))
        out[i] = (tp, len(pred_spans) - tp, len(gold_spans) - tp, correct, len(g))
    return out


def scores_from_counts(totals: np.ndarray) -> dict[str, np.ndarray]:
    """Micro scores from summed counts (..., 5); 0 where undefined (seqeval's zero_division=0)."""
    tp, fp, fn, correct, tokens = (totals[..., k].astype(float) for k in range(5))
    return {
        "entity_precision": _ratio(tp, tp + fp),
        "entity_recall": _ratio(tp, tp + fn),
        "entity_f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "token_accuracy": _ratio(correct, tokens),
    }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def token_metrics(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], seed: int = 0, resamples: int = 1000
) -> dict[str, object]:
    """{"n", "entity_f1", "entity_precision", "entity_recall", "token_accuracy"} and a `_ci95`
    interval for each. Point values come from seqeval itself; intervals from the counts."""
    from seqeval.metrics import accuracy_score
    from seqeval.metrics.sequence_labeling import precision_recall_fscore_support

    if not gold:
        raise ValueError("token_metrics: no sentences to score")
    g = [for_seqeval(list(s)) for s in gold]
    p = [for_seqeval(list(s)) for s in pred]
    counts = sentence_counts(g, p)
    precision, recall, f1, _ = precision_recall_fscore_support(g, p, average="micro", zero_division=0)
    point = {
        "entity_f1": f1,
        "entity_precision": precision,
        "entity_recall": recall,
        "token_accuracy": accuracy_score(g, p),
    }
    intervals = bootstrap_intervals(counts, seed, resamples)
    out: dict[str, object] = {"n": len(gold)}
    for name, value in point.items():
        out[name] = float(value)
        out[f"{name}_ci95"] = intervals[name]
    return out


def bootstrap_intervals(counts: np.ndarray, seed: int = 0, resamples: int = 1000) -> dict[str, list[float]]:
    """Percentile 95% interval of each micro score over `resamples` resamples of the sentences."""
    rng = np.random.default_rng(seed)
    n = len(counts)
    totals = []
    for start in range(0, resamples, _BLOCK):
        idx = rng.integers(0, n, size=(min(_BLOCK, resamples - start), n))  # (B, N)
        totals.append(counts[idx].sum(axis=1))  # (B, 5)
    values = scores_from_counts(np.concatenate(totals))
    return {name: [float(v) for v in np.percentile(vals, [2.5, 97.5])] for name, vals in values.items()}


def paired_comparison(
    gold: Sequence[Sequence[str]],
    pred_a: Sequence[Sequence[str]],
    pred_b: Sequence[Sequence[str]],
    *,
    resamples: int = 1000,
    permutations: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, object]]:
    """Per metric, system a against b on the same sentences: {"a_value", "b_value",
    "difference", "ci95" (paired bootstrap over `resamples` draws: both systems on the same drawn
    sentences), "p_value" (paired permutation test over `permutations` draws, default as many:
    each sentence's counts swapped between the systems with probability 1/2;
    (1 + #extreme) / (1 + permutations))}. For `taskfit compare`."""
    permutations = resamples if permutations is None else permutations
    a, b = sentence_counts(gold, pred_a), sentence_counts(gold, pred_b)  # (N, 5) each
    n = len(a)
    if n == 0:
        raise ValueError("paired_comparison: no sentences to compare")
    observed_a, observed_b = scores_from_counts(a.sum(axis=0)), scores_from_counts(b.sum(axis=0))
    boot_rng, perm_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    boot: dict[str, list[np.ndarray]] = {name: [] for name in observed_a}
    for start in range(0, resamples, _BLOCK):
        idx = boot_rng.integers(0, n, size=(min(_BLOCK, resamples - start), n))  # (B, N)
        for name, d in _differences(a[idx].sum(axis=1), b[idx].sum(axis=1)).items():
            boot[name].append(d)
    extreme = dict.fromkeys(observed_a, 0)
    for start in range(0, permutations, _BLOCK):
        swap = (perm_rng.random((min(_BLOCK, permutations - start), n)) < 0.5)[..., None]  # (B, N, 1)
        perm = _differences(np.where(swap, b, a).sum(axis=1), np.where(swap, a, b).sum(axis=1))
        for name, d in perm.items():
            observed = abs(float(observed_a[name] - observed_b[name]))
            extreme[name] += int(np.sum(np.abs(d) >= observed - 1e-12))
    out = {}
    for name in observed_a:
        diffs = np.concatenate(boot[name])
        out[name] = {
            "a_value": float(observed_a[name]),
            "b_value": float(observed_b[name]),
            "difference": float(observed_a[name] - observed_b[name]),
            "ci95": [float(v) for v in np.percentile(diffs, [2.5, 97.5])],
            "p_value": (1 + extreme[name]) / (1 + permutations),
        }
    return out


def _differences(totals_a: np.ndarray, totals_b: np.ndarray) -> dict[str, np.ndarray]:
    sa, sb = scores_from_counts(totals_a), scores_from_counts(totals_b)
    return {name: sa[name] - sb[name] for name in sa}
