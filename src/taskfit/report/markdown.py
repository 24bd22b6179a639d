"""report.md: the same sections as report.html in Markdown, with the plots written as PNG
files next to it (`report_files/`), for reading in a repository or pasting into notes."""

from __future__ import annotations

import re
from pathlib import Path

from taskfit.report.blocks import Example, Facts, Figure, Section, Subheading, Table, Text

FILES = "report_files"


def _cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, table.columns)) + " |"]
    lines.append(
        "|" + "|".join("---:" if table.numeric and table.numeric[i] else "---" for i in range(len(table.columns))) + "|"
    )
    for i, row in enumerate(table.rows):
        flag = " ⚠" if table.flagged and table.flagged[i] else ""
        cells = [_cell(c) for c in row]
        if flag:
            cells[-1] += flag
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in the text, so a prompt cannot close it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _example(example: Example) -> list[str]:
    fields = " · ".join(f"{k}: {_cell(v)}" for k, v in example.fields)
    lines = [f"**{_cell(example.title)}** — {fields}", "", *_code(example.prompt)]
    if example.output:
        lines += ["model output (first sample):", "", *_code(example.output)]
    return lines


def _code(text: str) -> list[str]:
    fence = _fence(text)
    return [fence + "text", text, fence, ""]


def _block(block, files: Path) -> list[str]:
    if isinstance(block, Text):
        return [block.text, ""]
    if isinstance(block, Facts):
        return [*(f"- **{k}**: {_cell(v)}" for k, v in block.items), ""]
    if isinstance(block, Subheading):
        return [f"### {block.text}", ""]
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        (files / f"{block.name}.png").write_bytes(block.png)
        caption = f"*{block.caption}*" if block.caption else ""
        return (
            [f"![{block.title}]({FILES}/{block.name}.png)", "", caption, ""]
            if caption
            else [f"![{block.title}]({FILES}/{block.name}.png)", ""]
        )
    if isinstance(block, Example):
        return _example(block)
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_markdown(title: str, sections: list[Section], folder: Path) -> str:
    """The Markdown text; writes the plots into `folder/report_files/` (old PNGs there removed)."""
    files = folder / FILES
    files.mkdir(parents=True, exist_ok=True)
    for old in files.glob("*.png"):
        old.unlink()
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            lines += _block(block, files)
    return "\n".join(lines).rstrip() + "\n"
