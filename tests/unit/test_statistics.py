"""Paired tests, corrections, spread, power and calibration against scipy/statsmodels."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats
from statsmodels.formula.api import ols
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower

from taskfit.evaluation import metrics
from taskfit.evaluation import statistics as st
from taskfit.evaluation.metrics import accuracy, macro_f1


def paired_systems(n, k=3, p_a=0.75, flip=0.15, seed=0):
    """System b copies system a and re-guesses a fraction `flip` of items: correlated like
    two prompts of one model, which is where pairing matters."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, k, n)
    a = np.where(rng.random(n) < p_a, gold, (gold + 1) % k)
    b = np.where(rng.random(n) < flip, rng.integers(0, k, n), a)
    return gold, a, b


# --------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_matches_the_paired_normal_approximation():
    gold, a, b = paired_systems(600)
    out = st.paired_bootstrap(accuracy, gold, a, b, 3, resamples=4000, seed=0)
    d = (a == gold).astype(float) - (b == gold)  # per-item difference: the paired quantity
    assert out["difference"] == pytest.approx(d.mean())
    se = d.std(ddof=0) / np.sqrt(len(d))
    low, high = out["ci95"]
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert (low + high) / 2 == pytest.approx(d.mean(), abs=0.5 * se)
    # an unpaired interval would be ~3x wider here; the paired one must not be
    unpaired_se = np.sqrt(((a == gold).var() + (b == gold).var()) / len(d))
    assert high - low < 0.6 * 2 * 1.96 * unpaired_se
    assert out["p_value"] == pytest.approx(2 * stats.norm.sf(abs(d.mean()) / se), abs=0.03)


def test_paired_bootstrap_blocks_draw_the_same_resamples(monkeypatch):
    gold, a, b = paired_systems(41, seed=3)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 41, size=(50, 41))  # the unblocked draw, all at once
    diffs = macro_f1(gold[idx], a[idx], 3) - macro_f1(gold[idx], b[idx], 3)
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 3 * 41)  # 17 blocks, the last one short
    out = st.paired_bootstrap(macro_f1, gold, a, b, 3, resamples=50, seed=7)
    assert out["ci95"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])))
    assert out["p_value"] == pytest.approx(min(1, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))))


def test_paired_bootstrap_is_seeded_and_identical_systems_have_p_one():
    gold, a, b = paired_systems(200)
    first = st.paired_bootstrap(accuracy, gold, a, b, 3, resamples=300, seed=1)
    assert first == st.paired_bootstrap(accuracy, gold, a, b, 3, resamples=300, seed=1)
    assert first != st.paired_bootstrap(accuracy, gold, a, b, 3, resamples=300, seed=2)
    same = st.paired_bootstrap(macro_f1, gold, a, a, 3, resamples=300)
    assert same == {"difference": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0}


def test_paired_inputs_are_checked():
    with pytest.raises(ValueError, match="equal length"):
        st.paired_bootstrap(accuracy, [0, 1], [0, 1], [0], 2)
    with pytest.raises(ValueError, match="at least one item"):
        st.paired_permutation_test(accuracy, [], [], [], 2)
    with pytest.raises(ValueError, match="resamples"):
        st.paired_bootstrap(accuracy, [0], [0], [1], 2, resamples=0)


# --------------------------------------------------------------------------- permutation test


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permutation_test_agrees_with_scipy_exact_on_accuracy(seed):
    # n=14: scipy enumerates all 2**14 swaps exactly; ours samples 20000 of them
    gold, a, b = paired_systems(14, flip=0.5, seed=seed)
    ours = st.paired_permutation_test(accuracy, gold, a, b, 3, resamples=20_000, seed=seed)
    ref = stats.permutation_test(
        ((a == gold).astype(float), (b == gold).astype(float)),
        lambda x, y, axis: x.mean(axis) - y.mean(axis),
        permutation_type="samples",
        n_resamples=np.inf,
        vectorized=True,
    )
    assert ours["difference"] == pytest.approx(ref.statistic)
    assert ours["p_value"] == pytest.approx(ref.pvalue, abs=0.02)


def test_permutation_test_agrees_with_scipy_exact_on_macro_f1():
    gold, a, b = paired_systems(13, flip=0.6, seed=5)
    ours = st.paired_permutation_test(macro_f1, gold, a, b, 3, resamples=20_000, seed=0)
    ref = stats.permutation_test(
        (a, b),
        lambda x, y, axis: macro_f1(gold, x, 3) - macro_f1(gold, y, 3),
        permutation_type="samples",
        n_resamples=np.inf,
        vectorized=True,
    )
    assert 0.05 < ref.pvalue < 1  # a case where the tail count matters
    assert ours["p_value"] == pytest.approx(ref.pvalue, abs=0.02)


def test_permutation_test_edge_cases_are_exact(monkeypatch):
    gold, a, b = paired_systems(300, seed=4)
    assert st.paired_permutation_test(macro_f1, gold, a, a, 3, resamples=99)["p_value"] == 1.0
    # a clear difference: nothing permuted is as extreme, so p is the floor 1 / (1 + R)
    better = gold.copy()
    assert st.paired_permutation_test(accuracy, gold, better, b, 3, resamples=99)["p_value"] == 0.01
    full = st.paired_permutation_test(accuracy, gold, a, b, 3, resamples=200, seed=3)
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 7 * 300)
    assert st.paired_permutation_test(accuracy, gold, a, b, 3, resamples=200, seed=3) == full


# --------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_matches_statsmodels_exact(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    ca, cb = rng.random(n) < rng.random(), rng.random(n) < rng.random()
    out = st.mcnemar_exact(ca, cb)
    assert out["a_only"] == int(np.sum(ca & ~cb)) and out["b_only"] == int(np.sum(~ca & cb))
    table = [[np.sum(ca & cb), np.sum(ca & ~cb)], [np.sum(~ca & cb), np.sum(~ca & ~cb)]]
    assert out["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-9)


def test_mcnemar_without_discordant_items():
    assert st.mcnemar_exact([True, False, True], [True, False, True]) == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    assert st.mcnemar_exact([True] * 8, [False] * 8)["p_value"] == pytest.approx(2 * 0.5**8)


# --------------------------------------------------------------------------- Holm


@pytest.mark.parametrize("seed", range(5))
def test_holm_matches_statsmodels(seed):
    rng = np.random.default_rng(seed)
    p = rng.random(int(rng.integers(1, 12))) ** 3
    p[: len(p) // 3] = p[-1]  # ties
    expected = multipletests(p, method="holm")[1]
    assert st.holm_bonferroni(list(p)) == pytest.approx(list(expected))


def test_holm_small_cases():
    assert st.holm_bonferroni([]) == []
    assert st.holm_bonferroni([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert st.holm_bonferroni([0.5, 0.9]) == [1.0, 1.0]
    with pytest.raises(ValueError):
        st.holm_bonferroni([0.1, 1.5])


# --------------------------------------------------------------------------- spread


def test_summarize():
    out = st.summarize([0.5, 0.7, 0.6, 0.9])
    std = np.std([0.5, 0.7, 0.6, 0.9], ddof=1)
    assert out == pytest.approx({"mean": 0.675, "std": std, "min": 0.5, "max": 0.9, "n": 4})
    assert isinstance(out["n"], int)
    assert st.summarize([0.3]) == {"mean": 0.3, "std": 0.0, "min": 0.3, "max": 0.3, "n": 1}
    with pytest.raises(ValueError):
        st.summarize([])


def test_variance_decomposition_by_hand():
    # grand mean 3; seed means 2, 4 -> SS 4; template means 1.5, 4.5 -> SS 9; total 14
    values = {(0, "a"): 1.0, (0, "b"): 3.0, (1, "a"): 2.0, (1, "b"): 6.0}
    shares = st.variance_decomposition(values, ("seed", "template"))
    assert shares == pytest.approx({"seed": 4 / 14, "template": 9 / 14, "residual": 1 / 14})


def test_variance_decomposition_matches_anova_on_a_balanced_design():
    rng = np.random.default_rng(0)
    seeds, templates = range(3), ["t0", "t1", "t2", "t3"]
    values = {(s, t): 0.6 + 0.02 * s + 0.05 * i + rng.normal(0, 0.02) for s in seeds for i, t in enumerate(templates)}
    shares = st.variance_decomposition(values, ("seed", "template"))
    frame = pd.DataFrame([(s, t, y) for (s, t), y in values.items()], columns=["seed", "template", "y"])
    table = anova_lm(ols("y ~ C(seed) + C(template)", data=frame).fit())
    total = table["sum_sq"].sum()
    assert shares["seed"] == pytest.approx(table.loc["C(seed)", "sum_sq"] / total)
    assert shares["template"] == pytest.approx(table.loc["C(template)", "sum_sq"] / total)
    assert shares["residual"] == pytest.approx(table.loc["Residual", "sum_sq"] / total)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_variance_decomposition_edge_cases():
    flat = {k: 0.5 for k in itertools.product([0, 1], ["a", "b"])}
    assert st.variance_decomposition(flat, ("seed", "template")) == {"seed": 0.0, "template": 0.0, "residual": 0.0}
    # levels 1 and "1" are different levels
    shares = st.variance_decomposition({(1,): 0.0, ("1",): 1.0}, ("x",))
    assert shares == pytest.approx({"x": 1.0, "residual": 0.0})
    with pytest.raises(ValueError, match="tuple of 2 levels"):
        st.variance_decomposition({(0,): 1.0}, ("seed", "template"))


# --------------------------------------------------------------------------- power


@pytest.mark.parametrize(("n", "p"), [(100, 0.5), (500, 0.7), (2000, 0.9)])
def test_unpaired_minimum_detectable_difference_has_the_requested_power(n, p):
    mdd = st.minimum_detectable_difference(n, p=p)
    sd = np.sqrt(p * (1 - p))  # per-item sd of correctness: standardizes the difference
    assert NormalIndPower().power(mdd / sd, nobs1=n, alpha=0.05, ratio=1.0) == pytest.approx(0.8, abs=1e-3)
    solved = NormalIndPower().solve_power(nobs1=n, alpha=0.05, power=0.8, ratio=1.0)
    assert mdd == pytest.approx(solved * sd, rel=1e-3)


def test_paired_minimum_detectable_difference_and_monotonicity():
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert st.minimum_detectable_difference(500, discordance=0.2) == pytest.approx(z * np.sqrt(0.2 / 500))
    z90 = stats.norm.ppf(0.995) + stats.norm.ppf(0.9)
    assert st.minimum_detectable_difference(50, discordance=0.3, alpha=0.01, power=0.9) == pytest.approx(
        z90 * np.sqrt(0.3 / 50)
    )
    assert st.minimum_detectable_difference(400) == pytest.approx(z * np.sqrt(0.5 / 400))
    sizes = [10, 100, 1000, 10_000]
    for kwargs in ({}, {"discordance": 0.1}, {"p": 0.8}):
        mdds = [st.minimum_detectable_difference(n, **kwargs) for n in sizes]
        assert all(x > y for x, y in zip(mdds, mdds[1:]))
    # pairing helps whenever the systems disagree less than two independent ones would
    assert st.minimum_detectable_difference(300, discordance=0.1) < st.minimum_detectable_difference(300, p=0.7)
    with pytest.raises(ValueError, match="not both"):
        st.minimum_detectable_difference(100, discordance=0.1, p=0.7)


# --------------------------------------------------------------------------- calibration

CONFIDENCE = [0.95, 0.85, 0.85, 0.55, 0.5, 1.0]
CORRECT = [True, False, True, True, False, True]


def test_ece_by_hand():
    # bins (0.9,1]: conf .975 acc 1; (0.8,0.9]: .85 vs .5; (0.5,0.6]: .55 vs 1; (0.4,0.5]: .5 vs 0
    expected = (2 * 0.025 + 2 * 0.35 + 0.45 + 0.5) / 6
    assert st.expected_calibration_error(CONFIDENCE, CORRECT) == pytest.approx(expected)
    ragged = [[0.95, 0.05], [0.85, 0.1, 0.05], [0.15, 0.85], [0.45, 0.55], [0.5, 0.5], [1.0]]
    assert st.expected_calibration_error(ragged, CORRECT) == pytest.approx(expected)
    assert st.expected_calibration_error(CONFIDENCE, CORRECT, n_bins=1) == pytest.approx(abs(4 / 6 - 4.7 / 6))
    assert st.expected_calibration_error([0.75, 0.75, 0.75, 0.75], [1, 1, 1, 0]) == pytest.approx(0.0)


def test_reliability_bins():
    bins = st.reliability_bins(CONFIDENCE, CORRECT, n_bins=10)
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 6
    assert bins[9] == pytest.approx({"lower": 0.9, "upper": 1.0, "confidence": 0.975, "accuracy": 1.0, "count": 2})
    assert bins[4]["count"] == 1 and bins[4]["accuracy"] == 0.0  # 0.5 lies in (0.4, 0.5]
    assert bins[0] == {"lower": 0.0, "upper": pytest.approx(0.1), "confidence": None, "accuracy": None, "count": 0}
    assert st.reliability_bins([0.0], [False], n_bins=4)[0]["count"] == 1
    with pytest.raises(ValueError):
        st.reliability_bins([0.5, 1.2], [True, False])


def test_option_probabilities():
    scores = np.random.default_rng(0).normal(-20, 5, 6)
    assert st.option_probabilities(list(scores)) == pytest.approx(list(special.softmax(scores)))
    assert st.option_probabilities([1000.0, 1000.0 + np.log(3)]) == pytest.approx([0.25, 0.75])
    assert st.option_probabilities([-1e6, -np.inf, -1e6]) == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError):
        st.option_probabilities([-np.inf, -np.inf])
