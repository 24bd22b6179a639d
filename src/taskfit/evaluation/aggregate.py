"""One entry of results.json from a cell's metrics at one or several seeds."""

from __future__ import annotations

import statistics
from typing import Any


def aggregate_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One seed: its metrics and the seed. Several: the mean of each metric, its sample
    standard deviation, min and max across seeds, and every seed's own metrics."""
    if len(per_seed) == 1:
        ((seed, metrics),) = per_seed.items()
        return {**metrics, "seed": seed}
    first = next(iter(per_seed.values()))
    out: dict[str, Any] = {"n": first["n"], "seeds": sorted(per_seed)}
    for name, value in first.items():
        if name == "n" or not isinstance(value, float | int):
            continue
        values = [m[name] for m in per_seed.values()]
        out[name] = statistics.fmean(values)
        out[f"{name}_std"] = statistics.stdev(values)
        out[f"{name}_min"], out[f"{name}_max"] = min(values), max(values)
    out["per_seed"] = {str(s): per_seed[s] for s in sorted(per_seed)}
    return out


def spread(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Across templates or demonstration sets: mean, std, min and max of each metric (each
    variant contributing its seed-averaged value), so a single number does not hide them."""
    first = next(iter(variants.values()))
    out: dict[str, Any] = {"n": first["n"], "variants": list(variants)}
    for name, value in first.items():
        if (
            name == "n"
            or not isinstance(value, float | int)
            or name.endswith(("_std", "_min", "_max"))
            or name == "seed"
        ):
            continue
        values = [v[name] for v in variants.values()]
        out[name] = statistics.fmean(values)
        out[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[f"{name}_min"], out[f"{name}_max"] = min(values), max(values)
    shares = _variance_shares(variants)
    if shares:
        out["variance_shares"] = shares
    return out


def _variance_shares(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric, which source of randomness explains how much of the spread: the variant
    (template / demonstration set) or the seed. Only meaningful with several seeds."""
    from taskfit.evaluation.statistics import variance_decomposition

    if not all("per_seed" in v for v in variants.values()):
        return {}
    first = next(iter(variants.values()))
    out = {}
    for name, value in next(iter(first["per_seed"].values())).items():
        if name == "n" or not isinstance(value, float | int):
            continue
        values = {(label, seed): m[name] for label, v in variants.items() for seed, m in v["per_seed"].items()}
        out[name] = variance_decomposition(values, ("variant", "seed"))
    return out
