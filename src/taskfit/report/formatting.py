"""How numbers read in the report's tables."""

from __future__ import annotations

import re
from typing import Any

DASH = "—"


def num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DASH
    return f"{value:.{digits}f}"


def interval(ci: Any, digits: int = 3) -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return DASH
    return f"[{num(ci[0], digits)}, {num(ci[1], digits)}]"


def p_value(p: Any) -> str:
    if isinstance(p, bool) or not isinstance(p, int | float):
        return DASH
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def metric_cell(result: dict[str, Any], metric: str) -> str:
    """`0.650 [0.517, 0.767]` for one seed; `0.650 ± 0.020 (3 seeds, 0.630–0.670)` for several."""
    if metric not in result:
        return DASH
    if f"{metric}_std" in result:
        if result.get("variants"):
            spread_of = f"{len(result['variants'])} variants"
        else:
            spread_of = f"{len(result.get('seeds') or result.get('per_seed') or [])} seeds"
        low, high = result.get(f"{metric}_min"), result.get(f"{metric}_max")
        span = f", {num(low)}–{num(high)}" if low is not None and high is not None else ""
        return f"{num(result[metric])} ± {num(result[metric + '_std'])} ({spread_of}{span})"
    if f"{metric}_ci95" in result:
        return f"{num(result[metric])} {interval(result[metric + '_ci95'])}"
    return num(result[metric])


NOT_METRICS = {"n", "seed", "seeds", "per_seed"}
SUFFIXES = ("_ci95", "_std", "_min", "_max")


def metric_names(results: list[dict[str, Any]]) -> list[str]:
    """Every metric of the results (numbers, not their intervals or spreads), in first-seen
    order with accuracy first."""
    names: dict[str, None] = {}
    for result in results:
        for key, value in result.items():
            if key in NOT_METRICS or key.endswith(SUFFIXES) or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                names.setdefault(key)
    return sorted(names, key=lambda m: m != "accuracy")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.").lower() or "x"
