"""Demonstrations drawn from the train split, fixed for all test examples of a run."""

from __future__ import annotations

import logging
import random
from collections import defaultdict

from taskfit.data import Example
from taskfit.errors import TaskfitError

log = logging.getLogger(__name__)


def select_demos(
    train: list[Example], shots: int, how: str, seed: int, where: str, exclude: list[Example] = (), id_field: str = "id"
) -> list[Example]:
    """`shots` train examples, never one whose content equals an example of `exclude` (the test split)."""
    if shots == 0:
        return []
    banned = {_content(ex, id_field) for ex in exclude}
    pool = [ex for ex in train if _content(ex, id_field) not in banned]
    if len(pool) < len(train):
        log.warning(
            "%s: %d train example(s) also occur in the test split; they are never used as demonstrations",
            where,
            len(train) - len(pool),
        )
    train = pool
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


def _content(ex: Example, id_field: str) -> str:
    return repr(sorted((k, repr(v)) for k, v in ex.fields.items() if k != id_field))
