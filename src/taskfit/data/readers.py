"""File readers: the (location, record) rows of a file, with errors that name the line.

A JSONL file is checked whole up front but not kept: its rows are read again from disk
when iterated (`JsonlRecords`), so a large test split costs two numbers per row in memory.
The other formats are read into a list.
"""

from __future__ import annotations

import csv
import json
import os
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from taskfit.errors import TaskfitError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

Record = tuple[str, dict[str, Any]]  # ("file:line", fields)


def read_records(path: Path) -> Sequence[Record]:
    """Read every row of a data file; an empty or malformed file is a `TaskfitError`."""
    if path.is_dir():
        raise TaskfitError(f"{path}: a folder, not a data file. Name the file itself in `task.data`.")
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


def _jsonl(path: Path) -> JsonlRecords:
    """Check every line now; keep only where each row starts."""
    offsets, numbers = array("q"), array("q")
    with path.open("rb") as f:
        offset = 3 if f.read(3) == b"\xef\xbb\xbf" else 0  # a UTF-8 byte order mark
        f.seek(offset)
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            _parse(raw, path, number)
            offsets.append(start)
            numbers.append(number)
    return JsonlRecords(path, offsets, numbers, _stamp(path))


def _parse(raw: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TaskfitError(
            f"{path}, line {number}: not UTF-8 text (undecodable byte at column {exc.start + 1}). "
            "Save the file with UTF-8 encoding."
        ) from None
    except json.JSONDecodeError as exc:
        raise TaskfitError(
            f"{path}, line {number}: not valid JSON ({exc.msg}). Each line must be one JSON object."
        ) from None
    if not isinstance(row, dict):
        raise TaskfitError(
            f"{path}, line {number}: expected a JSON object with named fields, got {type(row).__name__}."
        )
    return row


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class JsonlRecords(Sequence):
    """The rows of a checked JSONL file, read from disk on every pass (a slice is another view).
    Reading again a file that changed since it was checked is an error, not silently other data."""

    def __init__(self, path: Path, offsets: array, numbers: array, stamp: tuple[int, int]):
        self.path, self._offsets, self._numbers, self._stamp = path, offsets, numbers, stamp

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return JsonlRecords(self.path, self._offsets[index], self._numbers[index], self._stamp)
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return next(iter(self[index : index + 1 or None]))

    def __iter__(self) -> Iterator[Record]:
        if _stamp(self.path) != self._stamp:
            raise TaskfitError(
                f"{self.path}: the file changed while the run was using it. Run again on the finished file."
            )
        with self.path.open("rb") as f:
            for offset, number in zip(self._offsets, self._numbers):
                f.seek(offset)
                yield f"{self.path.name}:{number}", _parse(f.readline(), self.path, number)


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
        twice = sorted({name for name in reader.fieldnames if reader.fieldnames.count(name) > 1})
        if twice:
            raise TaskfitError(
                f"{path}, line 1: the header names column {', '.join(map(repr, twice))} more than once; only the "
                "last would be read. Give each column its own name."
            )
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
