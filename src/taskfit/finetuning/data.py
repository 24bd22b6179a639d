"""From a task's examples to model inputs: the text the model reads, the dev split, tokens.

Shared by every recipe: a multiple-choice or token-classification recipe reuses the dev
split and the fingerprint, and builds its own features with the same tokenizer settings.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from taskfit.data import Example
from taskfit.errors import TaskfitError
from taskfit.tasks import Task

Parts = tuple[str, ...]
"""The text of one input: one string, or two (a text pair: premise/hypothesis, question/passage)."""


def input_parts(task: Task, example: Example, where: str, skip: Sequence[str] = ()) -> Parts:
    """The fields of `task.input` (one, or two as a pair); by default every text field but id, label
    and the fields in `skip` (a multiple-choice task's option fields)."""
    cfg = task.config
    if cfg.input:
        if len(cfg.input) > 2:
            raise TaskfitError(
                f"task.input lists {len(cfg.input)} fields; a {task.type} model reads one text or a pair of two. "
                "Keep one or two fields (or leave `input` out to join every text field)."
            )
        missing = [f for f in cfg.input if f not in example.fields]
        if missing:
            raise TaskfitError(
                f"{example.source}: this row has no field '{missing[0]}' (named by `task.input`). "
                f"Fields present: {', '.join(map(str, example.fields))}."
            )
        return tuple("" if example.fields[f] is None else str(example.fields[f]) for f in cfg.input)
    skip = {cfg.id, cfg.label, *skip}
    texts = [v for k, v in example.fields.items() if k not in skip and isinstance(v, str)]
    if not texts:
        raise TaskfitError(
            f"{example.source}: {where}: this row has no text field to read besides the id and label. "
            "Name the fields the model reads with `task.input`."
        )
    return ("\n".join(texts),)


def prompt_of(parts: Parts) -> str:
    """The input as one string, for the `prompt` of a prediction row."""
    return "\n".join(parts)


def dev_strata(task: Task) -> Callable[[Example], Any]:
    """What a dev hold-out of `task` is stratified on: the gold answer (classification, multiple
    choice), whether a sentence has an entity (token classification), nothing (generation)."""
    if task.type == "generation":
        return lambda ex: 0
    if task.type == "token_classification":
        from taskfit.tasks.token_classification import OUTSIDE, tags_of

        return lambda ex: any(t != OUTSIDE for t in tags_of(ex, task.config))
    return lambda ex: ex.gold


def train_and_dev(task: Task, seed: int, where: str, key: Callable[[Example], Any]) -> tuple[list, list]:
    """The train split and the dev split; without a dev file, a stratified seeded hold-out of train.

    `key` is what to stratify on (the gold label for classification)."""
    train, dev = task.split("train"), task.split("dev")
    if not train:
        raise TaskfitError(f"{where}: fine-tuning needs training examples; add `task.data.train`.")
    if dev:
        return list(train), list(dev)
    kept, held = stratified_holdout(train, task.config.dev_fraction, seed, key)
    if not held:
        raise TaskfitError(
            f"{where}: the train split ({len(train)} examples) is too small to hold out a dev split "
            f"(task.dev_fraction = {task.config.dev_fraction}). Add `task.data.dev`, or more training data."
        )
    return kept, held


def stratified_holdout(items: Sequence, fraction: float, seed: int, key: Callable) -> tuple[list, list]:
    """Hold out about `fraction` of each stratum, seeded; every stratum keeps at least one item.

    Both parts keep the input order, so the split does not depend on anything but the seed."""
    strata: dict[Any, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        strata[key(item)].append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for _, members in sorted(strata.items(), key=lambda kv: str(kv[0])):
        take = min(round(len(members) * fraction), len(members) - 1)
        held.update(rng.sample(members, take))
    if not held:  # tiny splits: hold out one item of the largest stratum, if it can spare one
        largest = max(strata.values(), key=len)
        if len(largest) > 1:
            held.add(rng.choice(largest))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def tokenize(tokenizer, inputs: list[Parts], max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids per input, cut to `max_length`, unpadded (the collator pads per batch).

    Returns the features and how many inputs were truncated."""
    if not inputs:
        return [], 0
    columns = [list(c) for c in zip(*inputs)]  # [[first texts], [second texts]] for pairs
    if len(columns) == 2 and getattr(tokenizer, "sep_token", None) is None:
        # a tokenizer without a separator (decoder LMs) runs a pair's texts together ("goodis it"):
        # join them as `prompt_of` shows them
        columns = [[prompt_of(pair) for pair in inputs]]
    full = tokenizer(*columns, truncation=False, verbose=False)["input_ids"]
    encoded = tokenizer(*columns, truncation=True, max_length=max_length)
    truncated = sum(len(ids) > max_length for ids in full)
    names = [k for k in encoded if k in ("input_ids", "attention_mask", "token_type_ids")]
    features = [{k: encoded[k][i] for k in names} for i in range(len(inputs))]
    return features, truncated


def fingerprint(*parts: Any) -> str:
    """A stable hash of what a training run depends on, to tell a resumable checkpoint from a stale one."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
