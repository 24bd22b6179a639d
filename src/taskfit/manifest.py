"""What a run records about the environment it ran in."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("taskfit", "torch", "transformers", "tokenizers", "numpy", "jinja2", "pydantic")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(folder: Path) -> str | None:
    """The commit of the repository holding the experiment file, '+dirty' when it has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=folder, capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_per_cell = False


def reset_peak_memory() -> None:
    """Start a new peak for the cell about to run. Linux resets the process's peak resident
    memory on request (/proc/self/clear_refs); elsewhere the peak stays the process's so far.
    CUDA's allocator keeps its own peak, reset too."""
    global _per_cell
    try:
        _CLEAR_REFS.write_text("5")
        _per_cell = True
    except OSError:
        _per_cell = False
    torch = sys.modules.get("torch")  # never imported just for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> dict[str, Any]:
    """Peak resident memory (and peak GPU memory allocated, when used) since `reset_peak_memory`,
    or since the process started where the OS cannot reset it (`cpu_rss_scope` says which)."""
    hwm = _peak_rss_kb() if _per_cell else None
    if hwm is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out: dict[str, Any] = {"cpu_rss": round(rss / (1024 if sys.platform != "darwin" else 1024 * 1024), 1)}
        out["cpu_rss_scope"] = "process"
    else:
        out = {"cpu_rss": round(hwm / 1024, 1), "cpu_rss_scope": "cell"}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_allocated"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _peak_rss_kb() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def environment(folder: Path) -> dict[str, Any]:
    return {"versions": versions(), "git_commit": git_commit(folder), "platform": platform.platform()}
