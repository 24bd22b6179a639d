"""File readers: one list of (location, record) per file, with errors that name the line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from taskfit.errors import TaskfitError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

Record = tuple[str, dict[str, Any]]  # ("file:line", fields)


def read_records(path: Path) -> list[Record]:
    """Read every row of a data file; an empty or malformed file is a `TaskfitError`."""
    if not path.is_file():
        raise TaskfitError(
            f"{path}: data file not found. Check the path in `task.data` (relative to the experiment file)."
        )
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _delimited, ".tsv": _delimited, ".parquet": _parquet}
    if suffix not in readers:
        raise TaskfitError(f"{path}: unsupported file type '{suffix}'. Use one of {', '.join(SUFFIXES)}.")
    try:
        records = readers[suffix](path)
    except UnicodeDecodeError as exc:
        raise TaskfitError(
            f"{path}: the file is not UTF-8 text (undecodable byte at offset {exc.start}). Save it with UTF-8 encoding."
        ) from None
    if not records:
        raise TaskfitError(f"{path}: the file has no examples. Add at least one row.")
    return records


def _jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskfitError(
                    f"{path}, line {number}: not valid JSON ({exc.msg}). Each line must be one JSON object."
                ) from None
            if not isinstance(row, dict):
                raise TaskfitError(
                    f"{path}, line {number}: expected a JSON object with named fields, got {type(row).__name__}."
                )
            records.append((f"{path.name}:{number}", row))
    return records


def _json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise TaskfitError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}).") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise TaskfitError(f'{path}: expected a JSON list of objects (or {{"data": [...]}}).')
    return [(f"{path.name}:item {i}", row) for i, row in enumerate(data)]


def _delimited(path: Path) -> list[Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: Excel writes a BOM
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            return []
        records = []
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise TaskfitError(
                    f"{path}, line {line}: this row has {'more' if None in row else 'fewer'} columns than the header "
                    f"({len(reader.fieldnames)}). Quote fields that contain '{delimiter}'."
                )
            records.append((f"{path.name}:{line}", dict(row)))
    return records


def _parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise TaskfitError(f"{path}: cannot read this parquet file ({exc}).") from None
    return [(f"{path.name}:row {i}", row) for i, row in enumerate(rows)]
