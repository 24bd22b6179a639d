from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from taskfit.config import Experiment, TaskConfig
from taskfit.data import Example, LazyExamples, read_records
from taskfit.data.readers import JsonlRecords, Record
from taskfit.errors import TaskfitError, did_you_mean
from taskfit.tasks import classification, generation, multiple_choice, token_classification

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Task:
    """The user's task: its type, label space (classification) and examples per split."""

    config: TaskConfig
    splits: dict[str, Sequence[Example]]
    """train and dev are lists; a test split read from JSONL is a `LazyExamples` (read on each pass)."""
    labels: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    """Token classification: the tag set, in order (`O` first unless `task.tags` says otherwise)."""
    memo: dict = field(default_factory=dict, compare=False, repr=False)
    """Values derived from the splits, computed once per experiment (which train contents the test
    split also holds, for demonstrations); tasks made from this one with `replace` share it."""

    @property
    def type(self) -> str:
        return self.config.type

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.type == "generation":
            return ("exact_match", "token_f1", "rouge_l", "bleu", "chrf")
        if self.type == "token_classification":
            return ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
        return ("accuracy", "macro_f1") if self.type == "classification" else ("accuracy",)

    def split(self, name: str) -> Sequence[Example]:
        return self.splits.get(name, [])


def load_task(experiment: Experiment) -> Task:
    """Read and check every split of the experiment's task."""
    cfg = experiment.config.task
    records = {
        split: read_records(experiment.root / getattr(cfg.data, split))
        for split in SPLITS
        if getattr(cfg.data, split) is not None
    }
    for rows in records.values():
        for source, row in rows:
            require_field(cfg.label, row, source, "task.label")
    labels = tags = None
    if cfg.type == "classification":
        labels = classification.label_space(cfg, records)
        build: Callable[[Record, str], Example] = lambda rec, split: classification.to_example(cfg, labels, rec, split)
    elif cfg.type == "generation":
        build = lambda rec, split: generation.to_example(cfg, rec, split)
    elif cfg.type == "token_classification":
        tags, origin = token_classification.tag_space(cfg, records)
        build = lambda rec, split: token_classification.to_example(cfg, tags, rec, split, origin)
    else:
        build = lambda rec, split: multiple_choice.to_example(cfg, rec, split)
    splits: dict[str, Sequence[Example]] = {}
    for split, rows in records.items():
        make = lambda rec, split=split: build(rec, split)  # noqa: E731
        if split == "test" and isinstance(rows, JsonlRecords):
            examples: Sequence[Example] = LazyExamples(rows, make)  # every row is built (checked) below
        else:
            examples = [make(rec) for rec in rows]
        splits[split] = _with_unique_ids(examples, experiment.root / getattr(cfg.data, split))
    return Task(config=cfg, splits=splits, labels=tuple(labels) if labels else None, tags=tuple(tags) if tags else None)


def require_field(field: str, row: dict[str, Any], source: str, key: str) -> Any:
    if field not in row:
        hint = did_you_mean(field, row)
        raise TaskfitError(
            f"{source}: this row has no field '{field}' (named by `{key}` in the experiment file).{hint} "
            f"Fields present: {', '.join(map(str, row))}."
        )
    return row[field]


def _with_unique_ids(examples: Sequence[Example], path: Path) -> Sequence[Example]:
    """Check that ids are unique, holding 8 bytes per example (a hash), not the ids themselves;
    the slower pass that names the duplicate runs only when two hashes meet."""
    hashes = np.fromiter((hash(ex.id) for ex in examples), dtype=np.int64, count=len(examples))
    hashes.sort()
    if len(hashes) > 1 and (hashes[1:] == hashes[:-1]).any():
        seen: dict[str, str] = {}
        for ex in examples:
            if ex.id in seen:
                raise TaskfitError(
                    f"{path}: duplicate id '{ex.id}' at {seen[ex.id]} and {ex.source}. "
                    "Ids must be unique within a split."
                )
            seen[ex.id] = ex.source
    return examples


def example_id(cfg: TaskConfig, row: dict[str, Any], source: str, split: str) -> str:
    if cfg.id in row and row[cfg.id] not in (None, ""):
        return str(row[cfg.id])
    return f"{split}-{source.rsplit(':', 1)[-1].replace(' ', '')}"
