"""Metrics against scikit-learn, and the bootstrap against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score

from taskfit.evaluation import METRICS, bootstrap_ci, compute_metrics
from taskfit.evaluation.metrics import accuracy, macro_f1


@pytest.mark.parametrize("seed", range(8))
def test_accuracy_and_macro_f1_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    n = int(rng.integers(1, 60))
    gold = rng.integers(0, k, n)
    # skew predictions so that some classes are often missing from gold or prediction
    pred = np.where(rng.random(n) < 0.5, gold, rng.integers(0, k, n)) if seed % 2 else rng.integers(0, max(1, k - 1), n)
    assert float(accuracy(gold, pred, k)) == pytest.approx(accuracy_score(gold, pred))
    expected = f1_score(gold, pred, average="macro", labels=list(range(k)), zero_division=0)
    assert float(macro_f1(gold, pred, k)) == pytest.approx(expected)


def test_macro_f1_counts_classes_absent_everywhere():
    gold, pred = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])
    assert float(macro_f1(gold, pred, 2)) == 1.0
    assert float(macro_f1(gold, pred, 4)) == pytest.approx(0.5)  # classes 2 and 3 score 0


def test_metrics_are_vectorized_over_resamples():
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 3, (5, 40)), rng.integers(0, 3, (5, 40))
    for name, fn in METRICS.items():
        batched = fn(gold, pred, 3)
        assert batched.shape == (5,), name
        assert batched == pytest.approx([float(fn(g, p, 3)) for g, p in zip(gold, pred, strict=True)])


def sample(n=300, p=0.7, k=3, seed=1):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < p, gold, (gold + 1) % k)
    return gold, pred


def test_bootstrap_is_seeded():
    gold, pred = sample()
    assert bootstrap_ci(accuracy, gold, pred, 3, seed=4) == bootstrap_ci(accuracy, gold, pred, 3, seed=4)
    assert bootstrap_ci(accuracy, gold, pred, 3, seed=4) != bootstrap_ci(accuracy, gold, pred, 3, seed=5)


@pytest.mark.parametrize("name", ["accuracy", "macro_f1"])
def test_bootstrap_contains_the_point_estimate(name):
    gold, pred = sample()
    fn = METRICS[name]
    low, high = bootstrap_ci(fn, gold, pred, 3)
    assert low < float(fn(gold, pred, 3)) < high
    assert 0.02 < high - low < 0.3


def test_bootstrap_narrows_with_more_data():
    small = bootstrap_ci(accuracy, *sample(n=50), 3)
    large = bootstrap_ci(accuracy, *sample(n=2000), 3)
    assert large[1] - large[0] < (small[1] - small[0]) / 3


def test_bootstrap_accuracy_agrees_with_scipy():
    gold, pred = sample()
    low, high = bootstrap_ci(accuracy, gold, pred, 3, seed=0)
    ref = stats.bootstrap(
        ((gold == pred).astype(float),),
        np.mean,
        method="percentile",
        n_resamples=9999,
        confidence_level=0.95,
        random_state=0,
    ).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.02)
    assert high == pytest.approx(ref.high, abs=0.02)


def test_bootstrap_macro_f1_agrees_with_scipy():
    gold, pred = sample(n=200)
    low, high = bootstrap_ci(macro_f1, gold, pred, 3, seed=0)

    def statistic(g, p, axis=-1):
        return macro_f1(np.moveaxis(g, axis, -1), np.moveaxis(p, axis, -1), 3)

    ref = stats.bootstrap(
        (gold, pred), statistic, paired=True, vectorized=True, method="percentile", n_resamples=4000, random_state=0
    ).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.02)
    assert high == pytest.approx(ref.high, abs=0.02)


def test_bootstrap_of_a_constant_is_a_point():
    gold = np.zeros(30, dtype=int)
    assert bootstrap_ci(accuracy, gold, gold, 2) == (1.0, 1.0)
    assert bootstrap_ci(accuracy, gold, gold + 1, 2) == (0.0, 0.0)


def test_compute_metrics():
    gold, pred = [0, 1, 2, 2, 1], [0, 1, 1, 2, 1]
    out = compute_metrics(("accuracy", "macro_f1"), gold, pred, 3, seed=3)
    assert out["n"] == 5
    assert out["accuracy"] == pytest.approx(0.8)
    assert out["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", labels=[0, 1, 2], zero_division=0))
    assert list(out["accuracy_ci95"]) == list(bootstrap_ci(accuracy, np.array(gold), np.array(pred), 3, seed=3))
    assert isinstance(out["accuracy"], float)
    only_accuracy = compute_metrics(("accuracy",), gold, pred, 3, seed=3)
    assert only_accuracy == {k: out[k] for k in ("n", "accuracy", "accuracy_ci95")}


def test_bootstrap_ci_blocks_draw_the_same_resamples(monkeypatch):
    """Bounded memory for huge N must not change the interval: blocks replay the one big draw."""
    from taskfit.evaluation import metrics

    rng = np.random.default_rng(11)
    gold, pred = rng.integers(0, 3, 57), rng.integers(0, 3, 57)
    idx = np.random.default_rng(2).integers(0, 57, size=(200, 57))  # unblocked, all at once
    expected = np.percentile(macro_f1(gold[idx], pred[idx], 3), [2.5, 97.5])
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 3 * 57)  # 67 blocks, the last one short
    assert bootstrap_ci(macro_f1, gold, pred, 3, resamples=200, seed=2) == pytest.approx(tuple(expected), abs=0)
