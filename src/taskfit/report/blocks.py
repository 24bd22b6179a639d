"""The pieces a report is made of, independent of the output format.

Sections hold blocks; `html.py` and `markdown.py` render the same blocks, so the two files
always show the same tables and plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Text:
    text: str


@dataclass
class Facts:
    """Key-value pairs (the report header)."""

    items: list[tuple[str, str]]


@dataclass
class Subheading:
    text: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    name: str = ""
    """Used as the HTML id of the table (tests and readers look tables up by it)."""
    flagged: list[bool] = field(default_factory=list)
    """Per row: highlight it (e.g. a difference the test set is too small to tell)."""
    numeric: list[bool] = field(default_factory=list)
    """Per column: right-align it."""


@dataclass
class Figure:
    name: str
    """File stem, unique within a report: `report_files/<name>.png`."""
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Example:
    """One prediction shown in full: a few labelled fields and the prompt."""

    title: str
    fields: list[tuple[str, str]]
    prompt: str
    output: str = ""
    """What the model wrote (generation and chain-of-thought runs), when it wrote anything."""


Block = Text | Facts | Subheading | Table | Figure | Example


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]
