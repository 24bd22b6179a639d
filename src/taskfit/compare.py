"""Paired comparisons of cells that answered the same test items.

For every pair of cells at the same seed and every metric: the difference with a paired
bootstrap 95% interval, a paired test (exact McNemar for accuracy, a paired permutation
test otherwise), Holm–Bonferroni adjustment across all pairs of the metric, and the
minimum difference the test could detect at this test size (power 0.8, alpha 0.05).

A permutation test's p cannot go below 1 / (permutations + 1), and Holm multiplies the
smallest by the number of pairs m: with 1,000 permutations and 45 pairs no difference could
reach 0.01. Permutations therefore grow with the pairs (1,000 per pair, at most 20,000, and
at most PERMUTATION_BUDGET items drawn per test), recorded per row.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations
from typing import Any

import numpy as np

from taskfit.errors import TaskfitError
from taskfit.evaluation.metrics import METRICS, corpus_metric, mean_score
from taskfit.evaluation.statistics import (
    holm_bonferroni,
    mcnemar_exact,
    minimum_detectable_difference,
    paired_bootstrap,
    paired_permutation_test,
)
from taskfit.rundir import CellResult

PERMUTATIONS_PER_PAIR = 1000
MAX_PERMUTATIONS = 20000
PERMUTATION_BUDGET = 200_000_000
"""Items drawn by one permutation test at most (permutations x test items): bounds its time."""


def compare_cells(cells: list[CellResult], *, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All pairwise comparisons (see module docstring), as written to comparison.json."""
    _same_task(cells)
    names = _unique_names(cells)
    rows = []
    pairs = _pairs(cells)
    if not pairs:
        raise TaskfitError(
            f"nothing to compare: no two of these {len(cells)} cells are different runs at the same seed "
            f"({', '.join(sorted({c.name for c in cells}))}); paired comparisons need two runs or more."
        )
    for a, b in pairs:
        n = max(len(a.predictions), 1)
        permutations = max(
            resamples, min(PERMUTATIONS_PER_PAIR * len(pairs), MAX_PERMUTATIONS, PERMUTATION_BUDGET // n)
        )
        rows.extend(_compare_pair(a, b, names, (resamples, permutations), seed))
    for metric in {r["metric"] for r in rows}:
        family = [r for r in rows if r["metric"] == metric]
        for row, adjusted in zip(family, holm_bonferroni([r["p_value"] for r in family])):
            row["p_adjusted"] = adjusted
    return {"comparisons": rows, "seed": seed, "cells": fingerprints(cells)}


def fingerprints(cells: list[CellResult]) -> dict[str, str]:
    """Each cell's predictions, by its folder: what a stored comparison was computed from (the
    report uses it only while they match)."""
    return {str(c.folder.resolve()): c.digest for c in cells}


def _pairs(cells: list[CellResult]) -> list[tuple[CellResult, CellResult]]:
    """Pairs at the same seed; cells from single-seed folders pair with everything."""
    seeds = {c.seed for c in cells}
    if len(seeds) == 1 or len({c.label for c in cells}) == len(cells):
        return list(combinations(cells, 2))
    return [(a, b) for a, b in combinations(cells, 2) if a.seed == b.seed]


def _compare_pair(a: CellResult, b: CellResult, names: dict[int, str], draws: tuple[int, int], seed: int) -> list[dict]:
    """`draws`: (bootstrap resamples, permutations)."""
    kind = a.manifest.get("task", {}).get("type")
    resamples, permutations = draws
    if kind in ("generation", "token_classification"):
        return _compare_structured(kind, a, b, names, draws, seed)
    gold, pred_a, pred_b, n_classes = _aligned(a, b, names)
    out = []
    for metric in _metrics(a):
        fn = METRICS[metric]
        boot = paired_bootstrap(fn, gold, pred_a, pred_b, n_classes, resamples=resamples, seed=seed)
        correct_a, correct_b = pred_a == gold, pred_b == gold
        if metric == "accuracy":
            test, p = "mcnemar_exact", mcnemar_exact(correct_a, correct_b)["p_value"]
        else:
            perm = paired_permutation_test(fn, gold, pred_a, pred_b, n_classes, resamples=permutations, seed=seed)
            test, p = "paired_permutation", perm["p_value"]
        discordance = max(float(np.mean(correct_a != correct_b)), 1 / len(gold))
        # the detectable difference is McNemar's, on paired correct/incorrect items: accuracy's alone
        mdd = minimum_detectable_difference(len(gold), discordance=discordance) if metric == "accuracy" else None
        out.append(
            {
                "metric": metric,
                "a": names[id(a)],
                "b": names[id(b)],
                "seed": a.seed,
                "n": len(gold),
                "a_value": float(fn(gold, pred_a, n_classes)),
                "b_value": float(fn(gold, pred_b, n_classes)),
                "difference": boot["difference"],
                "ci95": boot["ci95"],
                "p_value": p,
                "test": test,
                **({"permutations": permutations} if test == "paired_permutation" else {}),
                "mdd": mdd,
            }
        )
    return out


def _compare_structured(
    kind: str, a: CellResult, b: CellResult, names, draws: tuple[int, int], seed: int
) -> list[dict]:
    """Generation: per-example exact match, token F1 and ROUGE-L, paired bootstrap and
    permutation over examples. Token classification: entity metrics over resampled sentences."""
    resamples, permutations = draws
    rows_a, rows_b = _same_items(a, b, names)
    ids = sorted(rows_a)
    correct_a = np.array([bool(rows_a[i].get("correct")) for i in ids])
    correct_b = np.array([bool(rows_b[i].get("correct")) for i in ids])
    mdd = minimum_detectable_difference(len(ids), discordance=max(float(np.mean(correct_a != correct_b)), 1 / len(ids)))
    base = {"a": names[id(a)], "b": names[id(b)], "seed": a.seed, "n": len(ids), "mdd": None}
    if kind == "token_classification":
        from taskfit.evaluation.token_metrics import paired_comparison

        gold = [rows_a[i]["label"] for i in ids]
        stats = paired_comparison(
            gold,
            [rows_a[i]["prediction"] for i in ids],
            [rows_b[i]["prediction"] for i in ids],
            resamples=resamples,
            permutations=permutations,
            seed=seed,
        )
        return [
            {
                "metric": m,
                **base,
                **{k: st[k] for k in ("a_value", "b_value", "difference", "ci95", "p_value")},
                "test": "paired_permutation",
                "permutations": permutations,
            }
            for m, st in stats.items()
        ]
    rows = list(_text_rows(rows_a, rows_b, ids, base, draws, seed))
    for row in rows:
        if row["metric"] == "exact_match":  # the detectable difference is one of paired correct/incorrect items
            row["mdd"] = mdd
    return rows


def _text_rows(rows_a, rows_b, ids, base: dict, draws: tuple[int, int], seed: int) -> Iterator[dict]:
    """Each text metric's paired comparison: the mean of per-example scores (exact match, token
    F1, ROUGE-L), and the corpus metrics BLEU and chrF, whose tests resample and swap the
    examples' n-gram counts (`text_metrics.corpus_statistics`; both systems' in one array, A's
    first, the predictions being indices into it)."""
    from taskfit.evaluation import text_metrics as tm

    refs = [rows_a[i].get("references") or [rows_a[i]["label"]] for i in ids]
    preds = [[rows[i]["prediction"] for i in ids] for rows in (rows_a, rows_b)]
    for name, fn in (("exact_match", tm.exact_match), ("token_f1", tm.token_f1), ("rouge_l", tm.rouge_l)):
        va, vb = (np.asarray(fn(p, refs), dtype=float) for p in preds)
        yield _paired_row(name, mean_score, va, vb, (float(va.mean()), float(vb.mean())), base, draws, seed)
    n = len(ids)
    for name in ("bleu", "chrf"):
        (stats_a, score), (stats_b, _) = (tm.corpus_statistics(name, p, refs) for p in preds)
        metric = corpus_metric(np.concatenate([stats_a, stats_b]), score)
        values = (score(stats_a.sum(axis=0)), score(stats_b.sum(axis=0)))
        yield _paired_row(name, metric, np.arange(n), n + np.arange(n), values, base, draws, seed)


def _paired_row(name: str, metric, pred_a, pred_b, values, base: dict, draws: tuple[int, int], seed: int) -> dict:
    """One comparison row: both values, the paired bootstrap's difference and interval, and the
    permutation test's p, of `metric` over the predictions `pred_a`, `pred_b` (gold unused)."""
    dummy = np.zeros(len(pred_a))
    boot = paired_bootstrap(metric, dummy, pred_a, pred_b, 0, resamples=draws[0], seed=seed)
    perm = paired_permutation_test(metric, dummy, pred_a, pred_b, 0, resamples=draws[1], seed=seed)
    return {
        "metric": name,
        **base,
        "a_value": values[0],
        "b_value": values[1],
        "difference": boot["difference"],
        "ci95": boot["ci95"],
        "p_value": perm["p_value"],
        "test": "paired_permutation",
        "permutations": draws[1],
    }


def _same_items(a: CellResult, b: CellResult, names) -> tuple[dict, dict]:
    """Both cells' rows by id, after checking they answered the same items with the same gold."""
    rows_a = {r["id"]: r for r in a.predictions}
    rows_b = {r["id"]: r for r in b.predictions}
    if rows_a.keys() != rows_b.keys():
        common = len(rows_a.keys() & rows_b.keys())
        raise TaskfitError(
            f"'{names[id(a)]}' ({len(rows_a)} test items) and '{names[id(b)]}' ({len(rows_b)}) did not answer the "
            f"same test items ({common} in common). Paired tests need the same items: run both on the same test "
            "split with the same --limit."
        )
    differ = [i for i in rows_a if _gold(rows_a[i]) != _gold(rows_b[i])]
    if differ:
        raise TaskfitError(
            f"'{names[id(a)]}' and '{names[id(b)]}' disagree on the gold answer of {len(differ)} test item(s) "
            f"(first: '{differ[0]}'): they used different test data. Compare runs of the same test split."
        )
    return rows_a, rows_b


def _gold(row: dict) -> Any:
    return row.get("label"), row.get("references")


def _aligned(a: CellResult, b: CellResult, names: dict[int, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Gold and both predictions as option indices, in one item order."""
    rows_a, rows_b = _same_items(a, b, names)
    ids = sorted(rows_a)
    labels = a.manifest.get("task", {}).get("labels") or []
    index = {label: i for i, label in enumerate(labels)}

    def as_int(cell: CellResult, item, field: str) -> int:
        value = (rows_a if cell is a else rows_b)[item][field]
        try:
            return index[value] if labels else int(value)
        except (KeyError, TypeError, ValueError):
            expected = f"one of the labels {labels}" if labels else "an option index"
            raise TaskfitError(
                f"{cell.folder / 'predictions.jsonl'}: item '{item}': {field} {value!r} is not {expected}. "
                "The run folder is damaged: run `taskfit run` again to rewrite it."
            ) from None

    gold = np.array([as_int(a, i, "label") for i in ids])
    pred_a = np.array([as_int(a, i, "prediction") for i in ids])
    pred_b = np.array([as_int(b, i, "prediction") for i in ids])
    n_classes = len(labels) or int(max(len(r.get("scores") or []) for r in a.predictions))
    return gold, pred_a, pred_b, n_classes


def _metrics(cell: CellResult) -> list[str]:
    return [m for m in METRICS if m in cell.metrics] or ["accuracy"]


def _same_task(cells: list[CellResult]) -> None:
    if len(cells) < 2:
        raise TaskfitError("compare needs at least two finished runs (cells); found " + str(len(cells)) + ".")
    types = {c.manifest.get("task", {}).get("type") for c in cells}
    if len(types) > 1:
        raise TaskfitError(
            f"these runs belong to different task types ({', '.join(map(str, types))}); compare runs of one task."
        )
    label_sets = {tuple(c.manifest.get("task", {}).get("labels") or []): c for c in cells}
    if len(label_sets) > 1:
        (x, a), (y, b) = list(label_sets.items())[:2]
        raise TaskfitError(
            f"{a.folder} and {b.folder} have different labels ({', '.join(x) or 'none'} vs {', '.join(y) or 'none'}): "
            "they are runs of different tasks; compare runs of one task."
        )


def _unique_names(cells: list[CellResult]) -> dict[int, str]:
    """The label, plus the seed when several seeds are present, plus the folder when still ambiguous."""
    several_seeds = len({c.seed for c in cells}) > 1
    names = {id(c): (c.name if several_seeds else c.label) for c in cells}
    if len(set(names.values())) < len(cells):
        names = {id(c): f"{names[id(c)]} ({c.folder})" for c in cells}
    return names
