"""Reading finished cells back from output folders (for compare and report)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskfit.errors import TaskfitError


@dataclass
class CellResult:
    folder: Path
    manifest: dict[str, Any]
    predictions: list[dict[str, Any]] = field(repr=False)
    digest: str = ""
    """A hash of predictions.jsonl as read: what a stored comparison of this cell was computed from."""

    @property
    def label(self) -> str:
        """The results.json key of this cell (run, or run@model)."""
        return self.manifest.get("label") or self.manifest["run"]

    @property
    def seed(self) -> int:
        return self.manifest.get("seed", 0)

    @property
    def name(self) -> str:
        """Unique within an experiment: the label, plus the seed when there are several."""
        return f"{self.label}#seed{self.seed}"

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


def load_cells(paths: list[str | Path]) -> list[CellResult]:
    """Every cell under the given folders: an experiment folder holds many, a cell folder one."""
    cells = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise TaskfitError(
                f"{path}: not a folder. Give a run folder or an experiment folder written by `taskfit run`."
            )
        single = path / "manifest.json"
        manifests = [single] if single.is_file() else sorted(path.rglob("manifest.json"))
        manifests = [m for m in manifests if (m.parent / "predictions.jsonl").is_file()]
        if not manifests:
            raise TaskfitError(f"{path}: no finished runs here (no manifest.json next to a predictions.jsonl).")
        cells.extend(sorted((_read(m.parent) for m in manifests), key=_config_order(path)))
    unique = {c.folder.resolve(): c for c in reversed(cells)}  # a folder given twice (or inside another) counts once
    return [c for c in cells if unique[c.folder.resolve()] is c]


def _config_order(folder: Path):
    """Sort key: the runs' order in the experiment's config.yaml (if it can be read: it only
    orders), then label and seed."""
    import yaml

    config = folder / "config.yaml"
    try:
        loaded = yaml.safe_load(config.read_text(encoding="utf-8")) if config.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        loaded = None
    runs = list(loaded.get("runs") or {}) if isinstance(loaded, dict) and isinstance(loaded.get("runs"), dict) else []
    return lambda c: (runs.index(c.manifest["run"]) if c.manifest["run"] in runs else len(runs), c.label, c.seed)


DAMAGED = "The run folder is damaged: run `taskfit run` again to rewrite it."


def _read(folder: Path) -> CellResult:
    """A finished cell's manifest and predictions, checked enough that compare and report can
    trust their shape: errors name the file and line."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskfitError(f"{path}: not valid JSON ({exc}). {DAMAGED}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("run"), str):
        raise TaskfitError(f"{path}: not a taskfit manifest (no 'run' name). {DAMAGED}")
    predictions, digest = _read_predictions(folder / "predictions.jsonl")
    return CellResult(folder, manifest, predictions, digest)


def _read_predictions(path: Path) -> tuple[list[dict[str, Any]], str]:
    """The rows of predictions.jsonl and a hash of the file's bytes."""
    data = path.read_bytes()
    predictions, seen = [], set()
    # split on newlines only: a JSON string may hold other line separators (U+2028) unescaped
    for number, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskfitError(f"{path}, line {number}: not valid JSON ({exc}). {DAMAGED}") from None
        if not isinstance(row, dict) or "id" not in row or "prediction" not in row:
            raise TaskfitError(f"{path}, line {number}: not a prediction row (no 'id' or 'prediction'). {DAMAGED}")
        if not isinstance(row["id"], str | int) or isinstance(row["id"], bool):
            raise TaskfitError(f"{path}, line {number}: the item id must be a string or a number. {DAMAGED}")
        if row["id"] in seen:
            raise TaskfitError(f"{path}, line {number}: item '{row['id']}' appears twice. {DAMAGED}")
        seen.add(row["id"])
        predictions.append(row)
    return predictions, hashlib.sha256(data).hexdigest()[:16]
