"""Demonstrations drawn from the train split, fixed for all test examples of a run."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence

from taskfit.data import Example
from taskfit.errors import TaskfitError

log = logging.getLogger(__name__)


def select_demos(
    train: Sequence[Example],
    shots: int,
    how: str,
    seed: int,
    where: str,
    exclude: Iterable[Example] = (),
    id_field: str = "id",
    memo: dict | None = None,
) -> list[Example]:
    """`shots` train examples, never one whose content equals an example of `exclude` (the test split,
    streamed past: memory follows the train split, not the test split)."""
    if shots == 0:
        return []
    contents = [_content(ex, id_field) for ex in train]
    banned = _banned(frozenset(contents), exclude, id_field, {} if memo is None else memo)
    pool = [ex for ex, c in zip(train, contents) if c not in banned]
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


def in_both(train: Sequence[Example], test: Iterable[Example], id_field: str = "id") -> int:
    """How many train examples have the content (every field but the id) of a test example."""
    contents = [_content(ex, id_field) for ex in train]
    banned = _banned(frozenset(contents), test, id_field, {})
    return sum(c in banned for c in contents)


def _banned(known: frozenset[str], exclude: Iterable[Example], id_field: str, memo: dict) -> set[str]:
    """The contents in `known` that `exclude` holds, computed once per (split, train contents)
    in `memo`: the strategies of an experiment (cells x template sets x dev selection) share
    one test split, which is then streamed once per distinct train split."""
    key = ("demo-exclusion", id(exclude), known, id_field)
    if key not in memo:  # the value holds `exclude` itself, so that its id is not reused meanwhile
        memo[key] = (exclude, {c for ex in exclude if (c := _content(ex, id_field)) in known})
    return memo[key][1]


def _content(ex: Example, id_field: str) -> str:
    return repr(sorted((k, repr(v)) for k, v in ex.fields.items() if k != id_field))
