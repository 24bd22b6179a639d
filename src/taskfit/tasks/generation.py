"""Generation: the gold is a target text (or a list of acceptable ones)."""

from __future__ import annotations

from taskfit.config import TaskConfig
from taskfit.data import Example
from taskfit.data.readers import Record
from taskfit.errors import TaskfitError


def to_example(cfg: TaskConfig, record: Record, split: str) -> Example:
    from taskfit.tasks.base import example_id

    source, row = record
    value = row[cfg.label]
    targets = [value] if not isinstance(value, list) else value
    targets = [str(t) for t in targets if t is not None]
    if not targets or any(not t.strip() for t in targets):
        raise TaskfitError(
            f"{source}: the target '{cfg.label}' is empty. A generation example needs a non-empty target text "
            "(or a list of acceptable ones)."
        )
    # options hold the acceptable references; the first one fills demonstrations.
    return Example(id=example_id(cfg, row, source, split), fields=row, options=tuple(targets), gold=0, source=source)
