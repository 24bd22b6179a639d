from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


class LazyExamples(Sequence):
    """Examples built from their records on every pass, never all held at once (a large test
    split read from JSONL); a slice is another lazy view."""

    def __init__(self, records: Sequence, build: Callable[[Any], Example]):
        self.records, self.build = records, build

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyExamples(self.records[index], self.build)
        return self.build(self.records[index])

    def __iter__(self) -> Iterator[Example]:
        return map(self.build, self.records)
