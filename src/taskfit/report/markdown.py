"""report.md: the same sections as report.html in Markdown, for reading in a repository or
pasting into notes. The plots are PNG files next to it (`report_files/`, written by `output.py`)."""

from __future__ import annotations

import re

from taskfit.report.blocks import Example, Facts, Figure, Section, Subheading, Table, Text

FILES = "report_files"

MARKUP = re.compile(r"[\\`*\[\]<>|#~&]|(?<!\w)_|_(?!\w)")
"""What Markdown (and the HTML it may hold) would read as markup in user text: emphasis, code,
links, tags, entities, table pipes. A backslash makes any of them a plain character. An `_`
inside a word (`macro_f1`) cannot start emphasis, so it stays as it is."""


def escape(text: object) -> str:
    """User text (run labels, class names, ids) as plain text on one line of Markdown."""
    return MARKUP.sub(lambda m: "\\" + m.group(0), str(text)).replace("\r", " ").replace("\n", " ")


def _number(text: object) -> str:
    """A numeric cell (the report's own numbers): only what would break the table is escaped,
    so `0.650 [0.517, 0.767]` reads as it is."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(map(escape, table.columns)) + " |"]
    lines.append(
        "|" + "|".join("---:" if table.numeric and table.numeric[i] else "---" for i in range(len(table.columns))) + "|"
    )
    for i, row in enumerate(table.rows):
        flag = " ⚠" if table.flagged and table.flagged[i] else ""
        cells = [_number(c) if table.numeric and table.numeric[j] else escape(c) for j, c in enumerate(row)]
        if flag:
            cells[-1] += flag
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in the text, so a prompt cannot close it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _example(example: Example) -> list[str]:
    fields = " · ".join(f"{escape(k)}: {escape(v)}" for k, v in example.fields)
    lines = [f"**{escape(example.title)}** — {fields}", "", *_code(example.prompt)]
    if example.output:
        lines += ["model output (first sample):", "", *_code(example.output)]
    return lines


def _code(text: str) -> list[str]:
    fence = _fence(text)
    return [fence + "text", text, fence, ""]


def _figure(block: Figure) -> list[str]:
    image = f"![{escape(block.title)}]({FILES}/{block.name}.png)"
    return [image, "", f"*{escape(block.caption)}*", ""] if block.caption else [image, ""]


def _block(block) -> list[str]:
    # Text is escaped too: report.html shows it as plain text, and notes quote run names.
    if isinstance(block, Text):
        return [escape(block.text), ""]
    if isinstance(block, Facts):
        return [*(f"- **{escape(k)}**: {escape(v)}" for k, v in block.items), ""]
    if isinstance(block, Subheading):
        return [f"### {escape(block.text)}", ""]
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        return _figure(block)
    if isinstance(block, Example):
        return _example(block)
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_markdown(title: str, sections: list[Section]) -> str:
    """The Markdown text; it links each figure as `report_files/<name>.png`."""
    lines = [f"# {escape(title)}", ""]
    for section in sections:
        lines += [f"## {escape(section.title)}", ""]
        for block in section.blocks:
            lines += _block(block)
    return "\n".join(lines).rstrip() + "\n"
