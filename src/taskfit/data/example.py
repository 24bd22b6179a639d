from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Example:
    """One item of a split, with its gold answer resolved against the task's options."""

    id: str
    fields: dict[str, Any] = field(repr=False)
    options: tuple[str, ...]
    """The answer options: the choices of a multiple-choice item, or the label names."""
    gold: int
    """Index of the gold answer in `options`."""
    source: str = ""
    """`file:line`, so that errors and reports can point at the row."""

    @property
    def gold_text(self) -> str:
        return self.options[self.gold]
