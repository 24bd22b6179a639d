"""Multiple choice: each example carries its own options; gold is an index or the option text."""

from __future__ import annotations

import json
from typing import Any

from taskfit.config import TaskConfig
from taskfit.data import Example
from taskfit.data.readers import Record
from taskfit.errors import TaskfitError


def to_example(cfg: TaskConfig, record: Record, split: str) -> Example:
    from taskfit.tasks.base import example_id

    source, row = record
    options = _options(cfg, row, source)
    gold = _gold_index(row[cfg.label], options, source, cfg.label)
    return Example(id=example_id(cfg, row, source, split), fields=row, options=options, gold=gold, source=source)


def _options(cfg: TaskConfig, row: dict[str, Any], source: str) -> tuple[str, ...]:
    from taskfit.tasks.base import require_field

    if isinstance(cfg.choices, list):
        values: Any = [require_field(f, row, source, "task.choices") for f in cfg.choices]
    else:
        values = require_field(cfg.choices, row, source, "task.choices")
        if isinstance(values, str) and values.lstrip().startswith("["):
            try:  # CSV cells can hold a JSON list
                values = json.loads(values)
            except json.JSONDecodeError:
                pass
    if not isinstance(values, list | tuple) or len(values) < 2:
        raise TaskfitError(
            f"{source}: field '{cfg.choices}' must be a list of at least two options, got {values!r}. "
            "In CSV files, write the list as JSON or name one field per option in `task.choices`."
        )
    for i, value in enumerate(values):
        if value is None or isinstance(value, list | dict):
            shown = "null" if value is None else f"a {type(value).__name__}"
            raise TaskfitError(
                f"{source}: option {i} in '{_named(cfg, i)}' is {shown}; each option must be a text. Fix the row."
            )
    options = tuple(str(v) for v in values)
    if len(set(options)) != len(options):
        twice = next(o for o in options if options.count(o) > 1)
        raise TaskfitError(
            f"{source}: option '{twice}' appears twice in '{_named(cfg, None)}', so a prediction of it could never "
            "be told right from wrong. Make the options distinct."
        )
    return options


def _named(cfg: TaskConfig, index: int | None) -> str:
    """The field holding option `index` (`task.choices` names one field, or one per option)."""
    if isinstance(cfg.choices, list):
        return cfg.choices[index] if index is not None else "', '".join(cfg.choices)
    return cfg.choices


def _gold_index(value: Any, options: tuple[str, ...], source: str, field: str) -> int:
    if isinstance(value, str) and value in options:
        return options.index(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(options):
            return value
        raise TaskfitError(
            f"{source}: gold '{field}' = {value} is out of range for {len(options)} options "
            f"(valid: 0 to {len(options) - 1})."
        )
    raise TaskfitError(
        f"{source}: gold '{field}' = {value!r} is neither an index into the options nor one of them: {list(options)}."
    )
