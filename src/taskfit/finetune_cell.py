"""A fine-tuning cell: train on (a nested seeded subset of) the train split, predict the
same test split as the prompt runs, and write the same files plus the cost of training."""

from __future__ import annotations

import importlib.util
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from taskfit.cell import Cell, write_cell, write_rows
from taskfit.config import FinetuneConfig
from taskfit.data import Example
from taskfit.errors import TaskfitError
from taskfit.manifest import reset_peak_memory
from taskfit.store import is_main_process
from taskfit.tasks import Task

log = logging.getLogger(__name__)


def check_finetune_cell(cell: Cell, config: FinetuneConfig, task: Task) -> None:
    """What can be checked without training: a train split, the sizes, qlora's needs, input fields."""
    where = f"runs.{cell.run}.finetune"
    train = task.split("train")
    if not train:
        raise TaskfitError(f"{where}: fine-tuning needs a train split. Add `task.data.train`.")
    pool = sized_splits(task, cell.train_size, cell.seed)[1] if cell.train_size is not None else train
    if isinstance(cell.train_size, int) and cell.train_size > len(pool):
        held = "" if len(pool) == len(train) else f" left after holding out a dev split ({len(train) - len(pool)})"
        raise TaskfitError(
            f"{where}.train_sizes: {cell.train_size} is more than the {len(pool)} train examples{held}. "
            "Use smaller sizes, or `all`."
        )
    if config.method == "qlora" and not _qlora_possible():
        raise TaskfitError(
            f"{where}.method: qlora needs a CUDA GPU and the bitsandbytes package; neither is usable here. "
            "Use `method: lora` (same adapters, full-precision base) on this machine."
        )
    for field in task.config.input or []:
        missing = next((ex for ex in train if field not in ex.fields), None)
        if missing is not None:
            raise TaskfitError(f"{missing.source}: no field '{field}' (named in `task.input`).")


def check_finetune_run(run: str, config: FinetuneConfig, task: Task, test: Sequence[Example]) -> None:
    """Once per run: train examples that are also test examples (training on them inflates the
    test metrics) are warned about; and the template (`_check_template`)."""
    from taskfit.prompting.demos import in_both

    leaked = in_both(task.split("train"), test, task.config.id)
    if leaked:
        log.warning(
            "runs.%s.finetune: %d train example(s) also occur in the test split; training on them inflates the "
            "test metrics. Remove them from the train file.",
            run,
            leaked,
        )
    if config.template is not None:
        _check_template(run, config, task)


def _check_template(run: str, config: FinetuneConfig, task: Task) -> None:
    """A fine-tuning template prompts decoder LMs on multiple choice and generation: there its
    syntax and fields are checked now on every example, not when training or testing reaches
    one; elsewhere it is unused, so say so."""
    from taskfit.prompting.template import Template

    where = f"runs.{run}.finetune.template"
    template = Template(config.template, where)  # a syntax error is an error whatever the task
    if task.type not in ("multiple_choice", "generation"):
        log.warning(
            "%s: not used: %s fine-tuning trains a head on the input text (remove the template)", where, task.type
        )
        return
    for split in ("train", "dev", "test"):  # every prompt it will read, as prompt runs are checked
        for example in task.split(split):
            template.render(example)


def _qlora_possible() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def nested_subset(train: list[Example], size: int | str | None, seed: int) -> list[Example]:
    """The first `size` examples of one seeded shuffle: smaller sizes are subsets of larger ones."""
    if size in (None, "all"):
        return list(train)
    order = list(train)
    random.Random(seed).shuffle(order)
    return order[: int(size)]


def sized_splits(task: Task, size: int | str | None, seed: int) -> tuple[list[Example], list[Example], list[Example]]:
    """(train subset, the pool it is drawn from, dev) of a `train_sizes` cell. Without a dev file,
    dev is held out of the whole train split first (as a run without sizes holds it out), and the
    nested subsets come from the rest: every size is evaluated on the same dev examples, none of
    which it trains on, and a size means that many training examples."""
    from taskfit.finetuning.data import dev_strata, stratified_holdout

    train, dev = list(task.split("train")), list(task.split("dev"))
    if not dev and size is not None:
        train, dev = stratified_holdout(train, task.config.dev_fraction, seed, dev_strata(task))
    return nested_subset(train, size, seed), train, dev


def run_finetune_cell(
    cell: Cell, config: FinetuneConfig, task: Task, test: Sequence[Example], out_dir: Path, root: Path, tracker=None
) -> dict[str, Any]:
    from taskfit.finetuning import FinetuneJob, run_finetune
    from taskfit.models.registry import resolve

    reset_peak_memory()
    start = time.perf_counter()
    train, _, dev = sized_splits(task, cell.train_size, cell.seed)
    source = resolve(cell.model.name).identity  # hashes the weights (remembered): once per cell
    key = job_key(cell, config, task, (train, dev, test), source)
    done = _finished(out_dir / cell.folder, key)
    if done is not None:
        log.info("%s: finished earlier with these settings and data; its results are kept", cell.folder)
        return done
    job = FinetuneJob(
        task=replace(task, splits={**task.splits, "train": train, "dev": dev}),
        config=config,
        model=cell.model,
        seed=cell.seed,
        test=test,
        folder=out_dir / cell.folder,
        where=f"runs.{cell.run}.finetune",
    )
    _check_device(cell.model.device, job.where)
    result = run_finetune(job)
    if not is_main_process():  # it trained with the main process, which writes the cell
        return {}
    if result.info.get("truncated_inputs"):
        log.warning(
            "%s: %d input(s) were longer than max_length (%s tokens) and were cut; raise `max_length` to train on them "
            "whole",
            job.where,
            result.info["truncated_inputs"],
            config.max_length,
        )
    identity = {
        **source,
        "dtype": result.info.get("dtype", "float32"),
        "device": result.info.get("device", cell.model.device),
    }
    extra = {
        "trainable_parameters": result.info.get("trainable_parameters", 0),
        "train_examples": len(train),
        "finetune": result.info,
        "config": {"finetune": config.model_dump(mode="json")},
        "job_key": key,
    }
    inputs = write_rows(out_dir / cell.folder, task, [result.rows])
    return write_cell(cell, task, inputs, identity, extra, out_dir, root, start, tracker)


def job_key(
    cell: Cell, config: FinetuneConfig, task: Task, splits: tuple[Sequence[Example], ...], source: dict[str, Any]
) -> str:
    """What a fine-tuning cell's results depend on: its settings, seed, model (`source`, the
    registry's identity with the weights' hash; dtype and device as set and as resolved), task,
    the train / dev / test examples and how taskfit computes (`COMPUTATION`, version). A cell
    whose manifest holds the same key is not trained again."""
    import taskfit
    from taskfit.finetuning.data import fingerprint
    from taskfit.finetuning.training import mixed_precision, uses_cpu
    from taskfit.store import COMPUTATION

    examples = [[(ex.id, ex.fields) for ex in split] for split in splits]
    resolved = (mixed_precision(cell.model), uses_cpu(cell.model.device))  # `auto` differs between machines
    model = (source, cell.model.model_dump(mode="json"), resolved)
    settings = (config.model_dump(mode="json"), task.config.model_dump(mode="json"), cell.seed)
    return fingerprint(settings, model, examples, COMPUTATION, taskfit.__version__)


def _finished(folder: Path, key: str) -> dict[str, Any] | None:
    """The metrics of the cell in `folder` if it finished with this very `key`, else None."""
    import json

    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("job_key") != key or not (folder / "predictions.jsonl").is_file():
        return None
    return manifest.get("metrics")


def _check_device(device: str, where: str) -> None:
    """A CUDA device the machine lacks is an error (training would silently fall back to the CPU)."""
    if device.startswith("cuda"):
        from taskfit.models.hf import pick_device

        try:
            pick_device(device)
        except TaskfitError as exc:
            raise TaskfitError(f"{where}: {exc}") from None
