"""Statistics for comparing systems honestly: paired tests, multiple-comparison correction,
spread across seeds and templates, power, and calibration.

Paired tests (bootstrap, permutation, McNemar) are the right tool when two systems answer
the same items; an unpaired test ignores that correlation and overstates the uncertainty.
Metric arguments have the signature of `taskfit.evaluation.metrics` (vectorized over a
leading resample axis). Every function is pure; randomness comes from an explicit seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from taskfit.evaluation.metrics import Metric, resample_blocks

# The same items summed in another order can differ in the last bits; a permuted difference
# that ties the observed one must still count as "at least as extreme".
_TIE_TOLERANCE = 1e-12


# --------------------------------------------------------------------------- paired tests


def _paired_arrays(gold, pred_a, pred_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gold, a, b = np.asarray(gold), np.asarray(pred_a), np.asarray(pred_b)
    if not (gold.ndim == a.ndim == b.ndim == 1) or not (len(gold) == len(a) == len(b)):
        raise ValueError(f"gold, pred_a, pred_b must be 1-D of equal length, got {gold.shape}, {a.shape}, {b.shape}")
    if len(gold) == 0:
        raise ValueError("a paired comparison needs at least one item")
    return gold, a, b


def _difference(metric: Metric, gold, a, b, n_classes: int) -> np.ndarray:
    return np.asarray(metric(gold, a, n_classes) - metric(gold, b, n_classes), dtype=float)


def paired_bootstrap(
    metric: Metric,
    gold,
    pred_a,
    pred_b,
    n_classes: int,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Paired percentile bootstrap of metric(a) - metric(b): each resample draws the same items
    for both systems, so their correlation is kept.

    Returns {"difference": float (on the full data), "ci95": [lo, hi] (2.5/97.5 percentiles of
    the resampled differences), "p_value": two-sided bootstrap p = min(1, 2 * min(P(d <= 0),
    P(d >= 0)))}. Deterministic for a given (seed, len(gold), resamples).
    """
    gold, a, b = _paired_arrays(gold, pred_a, pred_b)
    n = len(gold)
    rng = np.random.default_rng(seed)
    blocks = []
    for size in resample_blocks(resamples, n):
        idx = rng.integers(0, n, size=(size, n))  # (B, N)
        blocks.append(_difference(metric, gold[idx], a[idx], b[idx], n_classes))
    diffs = np.concatenate(blocks)  # (R,)
    low, high = np.percentile(diffs, [2.5, 97.5])
    p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    return {
        "difference": float(_difference(metric, gold, a, b, n_classes)),
        "ci95": [float(low), float(high)],
        "p_value": float(p),
    }


def paired_permutation_test(
    metric: Metric,
    gold,
    pred_a,
    pred_b,
    n_classes: int,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Two-sided paired permutation test of metric(a) - metric(b): under the null the two
    systems are exchangeable, so each item's pair of predictions is swapped with probability 1/2.

    Returns {"difference": observed float, "p_value": (1 + #(|d_perm| >= |d_obs|)) / (1 + resamples)}.
    The +1 counts the observed assignment, so p is never 0; identical systems give p == 1.
    """
    gold, a, b = _paired_arrays(gold, pred_a, pred_b)
    n = len(gold)
    observed = float(_difference(metric, gold, a, b, n_classes))
    rng = np.random.default_rng(seed)
    extreme = 0
    for size in resample_blocks(resamples, n):
        swap = rng.random((size, n)) < 0.5  # (B, N)
        perm_a, perm_b = np.where(swap, b, a), np.where(swap, a, b)
        diffs = _difference(metric, np.broadcast_to(gold, swap.shape), perm_a, perm_b, n_classes)
        extreme += int(np.sum(np.abs(diffs) >= abs(observed) - _TIE_TOLERANCE))
    return {"difference": observed, "p_value": (1 + extreme) / (1 + resamples)}


def mcnemar_exact(correct_a, correct_b) -> dict:
    """Exact McNemar test: a two-sided binomial test (p=1/2) on the discordant items.

    correct_a, correct_b: per-item booleans, whether each system got the item right.
    Returns {"a_only": #(a right, b wrong), "b_only": #(a wrong, b right), "p_value": float};
    p_value is 1.0 when there are no discordant items (nothing distinguishes the systems).
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"correct_a and correct_b must be 1-D of equal length, got {a.shape}, {b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if a_only + b_only == 0:
        p = 1.0
    else:
        from scipy import stats  # here, not at import: scipy.stats costs ~1 s of every run's start-up

        p = stats.binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue
    return {"a_only": a_only, "b_only": b_only, "p_value": float(p)}


def holm_bonferroni(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in input order: the i-th smallest p (0-based) is
    scaled by (m - i), then a running maximum keeps them monotone, capped at 1. Controls the
    family-wise error rate without independence assumptions."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p_values must be a flat list of numbers in [0, 1], got {list(p_values)}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted.tolist()


# --------------------------------------------------------------------------- spread


def summarize(values) -> dict:
    """{"mean", "std", "min", "max", "n"} of a flat list of numbers; std is the sample
    standard deviation (ddof=1), 0.0 for a single value."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"summarize needs a non-empty flat list of numbers, got shape {x.shape}")
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "n": len(x),
    }


def variance_decomposition(values: dict[tuple, float], factors: tuple[str, ...]) -> dict[str, float]:
    """Share of the total variance explained by each factor's main effect.

    values: one number per combination of levels, keyed by a tuple with one level per factor,
    e.g. {(seed, template): accuracy} with factors=("seed", "template").
    For factor f: SS_f = sum over its levels l of n_l * (mean_l - grand_mean)^2, and its
    share is SS_f / SS_total with SS_total = sum (y - grand_mean)^2. "residual" is the rest
    (interactions and noise), so the shares sum to 1. In a balanced fully crossed design the
    main effects are orthogonal (these are the two-way ANOVA sums of squares); in an
    unbalanced one they can overlap and the residual can come out negative.
    When SS_total is 0 (all values equal, or a single value) every share, residual
    included, is 0.0: there is no variance to explain.
    """
    if not values:
        raise ValueError("variance_decomposition needs at least one value")
    if len(set(factors)) != len(factors) or "residual" in factors:
        raise ValueError(f"factor names must be distinct and not 'residual', got {factors}")
    keys = list(values)
    bad = [k for k in keys if not isinstance(k, tuple) or len(k) != len(factors)]
    if bad:
        raise ValueError(f"every key must be a tuple of {len(factors)} levels {factors}, got {bad[0]!r}")
    y = np.array([values[k] for k in keys], dtype=float)
    deviation = y - y.mean()
    total = float(np.sum(deviation**2))
    if total == 0.0:
        return {**{f: 0.0 for f in factors}, "residual": 0.0}
    shares = {f: _main_effect_ss([k[i] for k in keys], deviation) / total for i, f in enumerate(factors)}
    shares["residual"] = 1.0 - sum(shares.values())
    return shares


def _main_effect_ss(levels: list, deviation: np.ndarray) -> float:
    """sum_l n_l * mean_l(deviation)^2, which equals sum_l n_l (mean_l - grand)^2."""
    codes: dict = {}  # level -> group index; a dict keeps any hashable level distinct (1 vs "1")
    inverse = np.array([codes.setdefault(level, len(codes)) for level in levels])
    counts = np.bincount(inverse)
    sums = np.bincount(inverse, weights=deviation)
    return float(np.sum(sums**2 / counts))


# --------------------------------------------------------------------------- power


def minimum_detectable_difference(
    n: int,
    *,
    discordance: float | None = None,
    p: float | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """Smallest accuracy difference a two-sided test on n items detects with the given power.

    Paired (discordance given: the fraction of items on which exactly one system is right):
        (z_{1-alpha/2} + z_{power}) * sqrt(discordance / n).
    Unpaired fallback (discordance None), two proportions near accuracy p (default 0.5):
        (z_{1-alpha/2} + z_{power}) * sqrt(2 p (1 - p) / n).
    Passing both is an error, because p would be silently ignored.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must lie in (0, 1), got alpha={alpha}, power={power}")
    from scipy import stats

    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    if discordance is not None:
        if p is not None:
            raise ValueError("give discordance (paired design) or p (unpaired design), not both")
        if not 0 <= discordance <= 1:
            raise ValueError(f"discordance must lie in [0, 1], got {discordance}")
        return float(z * np.sqrt(discordance / n))
    p = 0.5 if p is None else p
    if not 0 <= p <= 1:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    return float(z * np.sqrt(2 * p * (1 - p) / n))


# --------------------------------------------------------------------------- calibration


def option_probabilities(scores: Sequence[float]) -> list[float]:
    """Softmax of one item's option log-likelihood scores. Subtracting the maximum first keeps
    exp() from overflowing; -inf scores get probability 0."""
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1 or len(s) == 0 or np.any(np.isnan(s)) or not np.any(np.isfinite(s)):
        raise ValueError(f"scores must be a non-empty flat list with a finite value and no NaN, got {list(scores)}")
    e = np.exp(s - s[np.isfinite(s)].max())
    return (e / e.sum()).tolist()


def _confidences(probabilities) -> np.ndarray:
    """Confidence of the predicted option per item: the max of each item's option
    probabilities (option lists may differ in length), or the values themselves when
    `probabilities` already holds one confidence per item."""
    if len(probabilities) and np.ndim(probabilities[0]) == 1:
        conf = np.array([np.max(row) for row in probabilities], dtype=float)
    else:
        conf = np.asarray(probabilities, dtype=float)
    if conf.ndim != 1 or len(conf) == 0 or np.any(np.isnan(conf)) or np.any((conf < 0) | (conf > 1)):
        raise ValueError("probabilities must be non-empty and lie in [0, 1]")
    return conf


def reliability_bins(probabilities, correct, n_bins: int = 10) -> list[dict]:
    """Reliability diagram data: n_bins equal-width bins over [0, 1] of the confidence of the
    predicted option; bins are (lower, upper] (the first also takes 0), following Guo et al. 2017.

    probabilities: per item either its option probabilities (ragged lists allowed) or its
    confidence. correct: per-item booleans. Returns one dict per bin, in order:
    {"lower", "upper", "confidence": mean confidence, "accuracy", "count"}; an empty bin has
    count 0 and confidence/accuracy None.
    """
    conf = _confidences(probabilities)
    hit = np.asarray(correct, dtype=float)
    if hit.shape != conf.shape:
        raise ValueError(f"correct has shape {hit.shape}, probabilities describe {len(conf)} items")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(which, weights=hit, minlength=n_bins)
    return [
        {
            "lower": float(edges[i]),
            "upper": float(edges[i + 1]),
            "confidence": float(conf_sum[i] / counts[i]) if counts[i] else None,
            "accuracy": float(hit_sum[i] / counts[i]) if counts[i] else None,
            "count": int(counts[i]),
        }
        for i in range(n_bins)
    ]


def expected_calibration_error(probabilities, correct, n_bins: int = 10) -> float:
    """ECE = sum over bins of (count / N) * |accuracy - mean confidence|, with the bins of
    `reliability_bins` (same arguments)."""
    bins = reliability_bins(probabilities, correct, n_bins)
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))
