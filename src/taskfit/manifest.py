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


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak GPU memory allocated, when used)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_rss": round(rss / (1024 if sys.platform != "darwin" else 1024 * 1024), 1)}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["gpu_allocated"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except ImportError:
        pass
    return out


def environment(folder: Path) -> dict[str, Any]:
    return {"versions": versions(), "git_commit": git_commit(folder), "platform": platform.platform()}
