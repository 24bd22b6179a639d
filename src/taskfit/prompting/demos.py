"""Demonstrations drawn from the train split, fixed for all test examples of a run."""

from __future__ import annotations

import random
from collections import defaultdict

from taskfit.data import Example
from taskfit.errors import TaskfitError


def select_demos(train: list[Example], shots: int, how: str, seed: int, where: str) -> list[Example]:
    if shots == 0:
        return []
    if len(train) < shots:
        raise TaskfitError(
            f"{where}.shots: {shots} demonstrations requested but the train split has {len(train)} examples"
            f"{'' if train else ' (or there is no train split: add `task.data.train`)'}."
        )
    if how == "first":
        return train[:shots]
    rng = random.Random(seed)
    if how == "random":
        return rng.sample(train, shots)
    return _balanced(train, shots, rng)


def _balanced(train: list[Example], shots: int, rng: random.Random) -> list[Example]:
    """Round-robin over gold answers (labels; for multiple choice, the gold position) so that
    each appears as evenly as `shots` allows."""
    by_gold: dict[int, list[Example]] = defaultdict(list)
    for ex in train:
        by_gold[ex.gold].append(ex)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_gold.items())]
    chosen: list[Example] = []
    while len(chosen) < shots:
        for pool in pools:
            if pool and len(chosen) < shots:
                chosen.append(pool.pop())
    rng.shuffle(chosen)
    return chosen
