"""The run directory and the per-request cache that makes runs resumable.

    <out>/results.json             all runs' metrics (written atomically, merged with earlier runs)
    <out>/config.yaml              the resolved experiment config
    <out>/<run>/predictions.jsonl  one row per test example
    <out>/<run>/manifest.json      what the run decided and cost
    <out>/cache/<model>.sqlite     log-likelihood of every scored (context, continuation),
                                   generations of every generation request

The cache is written after every chunk of examples, so a killed run loses at most one
chunk; keys are the request text, so a config change recomputes only what it changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from taskfit.errors import TaskfitError
from taskfit.models.base import Request


def is_main_process() -> bool:
    """Whether this process writes the run's files and prints: always, except under
    `accelerate launch`/torchrun, where only global rank 0 does (the others train with it)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class PredictionFile:
    """`<cell>/predictions.jsonl` written row by row, so no run holds all its rows in memory.

    Rows go to a hidden partial file that replaces predictions.jsonl only when the cell
    finishes: a failed or killed run leaves an earlier predictions.jsonl as it was. An earlier
    manifest.json goes when its predictions are replaced: until the new one is written (after
    the metrics), the cell reads as unfinished rather than as the old run."""

    NAME = "predictions.jsonl"

    def __init__(self, folder: Path):
        self.path = folder / self.NAME
        self.partial = folder / f".{self.NAME}.partial"
        self.rows = 0

    def __enter__(self) -> PredictionFile:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.partial.open("w", encoding="utf-8")
        return self

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._file.flush()  # a chunk at a time: its rows leave memory, and a reader sees progress
        self.rows += len(rows)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None:
            (self.path.parent / "manifest.json").unlink(missing_ok=True)
            self.partial.replace(self.path)
        else:
            self.partial.unlink(missing_ok=True)


def request_key(req: tuple) -> str:
    """The cache key of a request: the hash of `context NUL continuation` (NUL `shared` where
    it is not 0) for log-likelihood requests, of the type and all fields for the others."""
    if isinstance(req, Request):
        text = f"{req.context}\x00{req.continuation}" + (f"\x00{req.shared}" if req.shared else "")
    else:
        text = json.dumps([type(req).__name__, *req], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


COMPUTATION = 7
"""How results are computed. Bump it with any change that moves the bits of a score or of a
generated text (layouts, kernels, decoding): the cache file depends on it, so a run resumed
after such a change recomputes everything instead of mixing results of two versions.
(2: generation decodes in slots and runs a shared start apart; scoring chunks by text.
3: prefixes per cluster of a call's groups (replaced); 4: scoring shares the start a request
declares (`Request.shared`), not a call's common prefix; 5: that start also holds a chat
header without fixed demonstrations and the template's literal start; 6: each row's attention
runs at its own length rounded up to 4; 7: a call's prefixes run together in batches through
that attention, and a declared start leaves out the template lead's trailing spaces.
Files of earlier versions stay where they were, unread.)"""


class ScoreCache:
    """Results already computed by one model (identity, dtype, device type and `COMPUTATION`), in SQLite.

    Lookups go to the file, so a run's memory does not grow with the number of requests
    (a dict of 300k keys took ~90 MB); each `add` is one transaction, so a killed run loses
    at most the chunk in flight and the file is never left half-written."""

    LOOKUP = 500
    """Keys per query (SQLite limits the number of bound parameters)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS results (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID")

    @classmethod
    def for_model(cls, out: Path, identity: dict[str, Any]) -> ScoreCache:
        fields = {k: identity.get(k) for k in ("name", "sha256", "hub_id", "dtype")}
        if identity.get("recheck_margin"):
            fields["recheck_margin"] = identity["recheck_margin"]
        fields["device"] = str(identity.get("device", "")).split(":")[0]
        fields["computation"] = COMPUTATION
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
        return cls(out / "cache" / f"{key}.sqlite")

    def get(self, req: tuple) -> Any:
        """The remembered result (a log-likelihood, or a list of generations), or None."""
        return self.get_many([req]).get(req)

    def get_many(self, reqs: list[tuple]) -> dict[tuple, Any]:
        """The remembered results of those requests that have one."""
        by_key = {request_key(r): r for r in reqs}
        keys, found = list(by_key), {}
        for i in range(0, len(keys), self.LOOKUP):
            part = keys[i : i + self.LOOKUP]
            query = f"SELECT k, v FROM results WHERE k IN ({','.join('?' * len(part))})"
            for key, value in self._db.execute(query, part):
                found[by_key[key]] = json.loads(value)
        return found

    def add(self, scored: dict[tuple, Any]) -> None:
        with self._db:  # one transaction
            self._db.executemany(
                "INSERT OR REPLACE INTO results VALUES (?, ?)",
                [(request_key(req), json.dumps(value)) for req, value in scored.items()],
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def merge_results(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """Earlier runs' results stay unless this invocation reran them."""
    old = read_results(path)
    return {**{k: v for k, v in old.items() if k not in new}, **new}


def read_results(path: Path) -> dict[str, Any]:
    """An output folder's results.json ({} if none), refused if it is not one taskfit wrote: a
    run must not replace a user's own file of that name."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        old = exc
    if not isinstance(old, dict) or not all(isinstance(v, dict) for v in old.values()):
        raise TaskfitError(
            f"{path}: not a results.json written by taskfit, so this run would replace it. Move it away, or give "
            "the run another output folder (--out)."
        )
    return old


def check_out_dir(out_dir: Path, experiment: Path) -> None:
    """Refuse, before anything is computed, an output folder that would overwrite what a user
    has: a file where the folder goes, the experiment file itself (as <out>/config.yaml), a
    results.json that is not taskfit's."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TaskfitError(f"{out_dir}: a file, where the run's output folder goes. Give a folder (--out).")
    config = out_dir / "config.yaml"
    if config.exists() and experiment.exists() and config.samefile(experiment):
        raise TaskfitError(
            f"{experiment}: the experiment file is in the run's output folder, where the run writes its resolved "
            "config.yaml over it. Move the experiment file out of that folder, or give another folder with --out."
        )
    if config.exists() and not _is_experiment(config):
        raise TaskfitError(
            f"{config}: not a config.yaml written by taskfit, so this run would replace it. Move it away, or give "
            "the run another output folder (--out)."
        )
    read_results(out_dir / "results.json")


def _is_experiment(path: Path) -> bool:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(loaded, dict) and {"task", "runs"} <= loaded.keys()
