"""Reading finished cells back from output folders (for compare and report)."""

from __future__ import annotations

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
    return cells


def _config_order(folder: Path):
    """Sort key: the runs' order in the experiment's config.yaml, then label and seed."""
    import yaml

    config = folder / "config.yaml"
    runs = list((yaml.safe_load(config.read_text()) or {}).get("runs", {})) if config.is_file() else []
    return lambda c: (runs.index(c.manifest["run"]) if c.manifest["run"] in runs else len(runs), c.label, c.seed)


def _read(folder: Path) -> CellResult:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    with (folder / "predictions.jsonl").open(encoding="utf-8") as f:
        predictions = [json.loads(line) for line in f if line.strip()]
    return CellResult(folder, manifest, predictions)
