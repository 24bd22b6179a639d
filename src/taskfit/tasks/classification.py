"""Classification: a fixed label space shared by all examples."""

from __future__ import annotations

from typing import Any

from taskfit.config import TaskConfig
from taskfit.data import Example
from taskfit.data.readers import Record
from taskfit.errors import TaskfitError


def label_space(cfg: TaskConfig, records: dict[str, list[Record]]) -> list[str]:
    if cfg.labels:
        return list(cfg.labels)
    split = "train" if "train" in records else "test"
    found = sorted({_label(row.get(cfg.label)) for _, row in records[split] if cfg.label in row})
    if len(found) < 2:
        raise TaskfitError(
            f"task.labels: the {split} split has {len(found)} distinct label(s) in field '{cfg.label}'; "
            "a classification task needs at least two. List them under `task.labels`."
        )
    return found


def to_example(cfg: TaskConfig, labels: list[str], record: Record, split: str) -> Example:
    from taskfit.tasks.base import example_id

    source, row = record
    gold = _label(row[cfg.label])
    if gold not in labels:
        raise TaskfitError(
            f"{source}: gold label '{gold}' is not among the task's labels ({', '.join(labels)}). "
            "Fix the row, or add the label to `task.labels`."
        )
    return Example(
        id=example_id(cfg, row, source, split),
        fields=row,
        options=tuple(labels),
        gold=labels.index(gold),
        source=source,
    )


def _label(value: Any) -> str:
    # CSV gives strings, JSON may give ints or bools: compare labels as text.
    return str(value).strip() if not isinstance(value, bool) else str(value).lower()
