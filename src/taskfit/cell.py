"""One cell of the grid: a run with one model, one seed and (optionally) one template or
demonstration set, scored on the test split chunk by chunk and written to its folder."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from taskfit.config import ModelConfig, PromptConfig
from taskfit.data import Example
from taskfit.errors import TaskfitError
from taskfit.evaluation.rows import MetricInputs
from taskfit.manifest import environment, peak_memory_mb, reset_peak_memory
from taskfit.models.cached import CachedLM
from taskfit.prompting import build_strategy
from taskfit.prompting.strategy import ScoreStrategy
from taskfit.store import PredictionFile, atomic_write
from taskfit.tasks import Task

log = logging.getLogger(__name__)

CHUNK = 64
GENERATION_SEQUENCES = 256
"""A generating strategy's chunks (one model call and one cache append each; their cost is in
the tokens they write, which the data does not tell): at least CHUNK examples, more while they
draw at most GENERATION_SEQUENCES sequences (examples x samples). Decoding slots refill from a
call's waiting rows and empty at its end: 192 greedy prompts of 48 new tokens took ~12% longer
in calls of 64 than in one. Fixed by the configuration alone, so resumed runs batch alike."""

SCORE_CHUNK_CHARS = 64_000
SCORE_CHUNK_MAX = 512
"""A scoring strategy's chunks: consecutive examples up to SCORE_CHUNK_CHARS characters of field
text, and at most SCORE_CHUNK_MAX examples. A bigger call fills bigger batches and rechecks its
near-ties in fewer float32 passes (300 zero-shot items scored ~14% faster in one call than in
chunks of 64), while a split of long documents still finishes a chunk every few seconds. The
boundaries depend on the data alone, so resumed runs batch alike."""

MIN_CARVED_DEV = 10


@dataclass(frozen=True)
class Cell:
    run: str
    model: ModelConfig
    seed: int
    folder: str
    """Relative to the output folder."""
    label: str
    """Key in results.json: the run (with its variant), or `run@model` when the grid has several models."""
    template: int | None = None
    """`combine: each`: the index of this cell's template."""
    demo_set: int | None = None
    """`demo_sets`: which redraw of the demonstrations this cell uses."""
    train_size: int | str | None = None
    """Fine-tuning `train_sizes`: how many train examples this cell trains on ("all": every one)."""
    shots: int | None = None
    """`shots: [...]`: this cell's number of demonstrations."""

    @property
    def is_variant(self) -> bool:
        return any(v is not None for v in (self.template, self.demo_set, self.train_size, self.shots))

    def prompt_of(self, prompt: PromptConfig) -> PromptConfig:
        """The run's prompt settings as this cell uses them (one count of demonstrations)."""
        return prompt if self.shots is None else prompt.model_copy(update={"shots": self.shots})

    @property
    def demo_seed(self) -> int:
        """The seed of this cell's demonstrations: the run's seed, or for demo set d >= 1 a hash
        of (seed, d), so that no set of one seed redraws another seed's (seed * 7919 + d made
        set 1 of seed 0 the same draw as set 0 of seed 1, correlating the spread's sources)."""
        if not self.demo_set:
            return self.seed
        digest = hashlib.blake2b(f"demo-set\0{self.seed}\0{self.demo_set}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


def check_cell(cell: Cell, prompt: PromptConfig, task: Task, examples: Sequence[Example]) -> None:
    """Build the cell's strategy and render every prompt, without a model."""
    prompt = cell.prompt_of(prompt)
    task, _ = _splits_for(cell, prompt, task)
    for templates in _template_sets(cell, prompt):
        strategy = build_strategy(prompt, task, cell.demo_seed, f"runs.{cell.run}.prompt", templates=templates)
        strategy.check(examples)


def run_cell(
    cell: Cell,
    prompt: PromptConfig,
    task: Task,
    examples: Sequence[Example],
    lm: CachedLM,
    out_dir: Path,
    root: Path,
    progress=None,
    tracker=None,
) -> dict[str, Any]:
    reset_peak_memory()
    start = time.perf_counter()
    prompt = cell.prompt_of(prompt)
    computed_before, truncated_before = lm.computed, getattr(lm.lm, "truncated", 0)
    rechecked_before = getattr(lm.lm, "rechecked", 0)
    task, dev = _splits_for(cell, prompt, task)
    where = f"runs.{cell.run}.prompt"
    selection = None
    templates = _template_sets(cell, prompt)
    if len(templates) > 1:  # select_on_dev: the choice sees dev only, never test
        selection = _select_on_dev(cell, prompt, task, dev, lm, templates)
        templates = [templates[selection["chosen_template"]]]
    strategy = build_strategy(prompt, task, cell.demo_seed, where, chat=lm.chat, templates=templates[0])
    inputs = write_rows(out_dir / cell.folder, task, _predict(strategy, examples, lm, progress, cell.folder))
    truncated = getattr(lm.lm, "truncated", 0) - truncated_before
    if truncated:
        log.warning("%s: %d prompt(s) exceeded the model's context and were cut from the left", cell.folder, truncated)
    extra = {
        **({"selection": selection} if selection else {}),
        "requests_computed": lm.computed - computed_before,
        "truncated_prompts": truncated,
        **({"rechecked_in_float32": lm.lm.rechecked - rechecked_before} if hasattr(lm.lm, "rechecked") else {}),
        "trainable_parameters": 0,
        "config": {"prompt": prompt.model_dump(mode="json")},
    }
    metrics = write_cell(cell, task, inputs, lm.identity, extra, out_dir, root, start, tracker)
    _warn_failed_parsing(cell, metrics)
    return metrics


FAILED_SHARE = 0.5
"""Share of examples whose answer could not be read from the generated text above which a run warns."""


def _warn_failed_parsing(cell: Cell, metrics: dict[str, Any]) -> None:
    """The results table shows accuracy alone: say so when most answers were not found in the
    generated text (an `extract` pattern that never matches, entity lines in another format)."""
    for rate, what in (("extraction_failed", "prompt.extract"), ("parse_failed", "the entity lines' format")):
        share = metrics.get(rate)
        if isinstance(share, int | float) and share >= FAILED_SHARE:
            log.warning(
                "%s: no answer could be read from %.0f%% of the generated texts (%s = %.3f); check %s against the "
                "generations in predictions.jsonl",
                cell.folder,
                100 * share,
                rate,
                share,
                what,
            )


def write_rows(folder: Path, task: Task, chunks: Iterable[list[dict[str, Any]]]) -> MetricInputs:
    """Stream prediction rows to `folder/predictions.jsonl` (in place once all are written),
    keeping only what the metrics need."""
    inputs = MetricInputs(task)
    with PredictionFile(folder) as predictions:
        for rows in chunks:
            predictions.write(rows)
            inputs.add(rows)
    return inputs


def write_cell(
    cell: Cell, task: Task, inputs: MetricInputs, model_identity, extra, out_dir, root, start, tracker
) -> dict[str, Any]:
    """Metrics and manifest of a cell whose predictions are written (both routes), then tracking."""
    cell_dir = out_dir / cell.folder
    metrics = inputs.metrics(cell.seed)
    manifest = {
        "run": cell.run,
        "label": cell.label,
        "folder": cell.folder,
        "seed": cell.seed,
        "template": cell.template,
        "demo_set": cell.demo_set,
        "train_size": cell.train_size,
        "model": model_identity,
        "task": {"type": task.type, "labels": list(task.labels or []), "tags": list(getattr(task, "tags", None) or [])},
        "metrics": metrics,
        "examples": inputs.n,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "peak_memory_mb": peak_memory_mb(),
        **extra,
        **environment(root),
    }
    atomic_write(cell_dir / "manifest.json", json.dumps(manifest, indent=2))
    if tracker is not None:
        tracker.log_cell(cell_dir, manifest)
    return metrics


def _predict(
    strategy, examples: Sequence[Example], lm: CachedLM, progress, name: str
) -> Iterator[list[dict[str, Any]]]:
    """The rows of each chunk of examples, as they are predicted."""
    task_id = progress.add_task(name, total=len(examples)) if progress else None
    if isinstance(strategy, ScoreStrategy):
        chunks = _text_chunks(examples, SCORE_CHUNK_CHARS, SCORE_CHUNK_MAX)
    else:
        chunks = _chunks(examples, generation_chunk(strategy.cfg.samples))
    for chunk in chunks:
        yield strategy.predict(chunk, lm)
        if progress:
            progress.advance(task_id, len(chunk))


def _template_sets(cell: Cell, prompt: PromptConfig) -> list[list[str]]:
    """The template lists to build strategies from: one (ensemble or single), or one per
    template when the cell must choose one on dev."""
    templates = prompt.template_list
    if cell.template is not None:
        return [[templates[cell.template]]]
    if prompt.templates and prompt.combine == "select_on_dev":
        return [[t] for t in templates]
    return [templates]


def _select_on_dev(cell, prompt, task, dev, lm, templates) -> dict[str, Any]:
    scores = []
    for i, one in enumerate(templates):
        strategy = build_strategy(prompt, task, cell.demo_seed, f"runs.{cell.run}.prompt", chat=lm.chat, templates=one)
        inputs = MetricInputs(task)
        for rows in _predict(strategy, dev, lm, None, f"{cell.folder} dev t{i}"):
            inputs.add(rows)
        metrics = inputs.metrics(cell.seed)
        scores.append(metrics[task.metrics[0]])
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return {"metric": task.metrics[0], "dev_scores": scores, "chosen_template": best, "dev_size": len(dev)}


def _splits_for(cell: Cell, prompt: PromptConfig, task: Task) -> tuple[Task, list[Example]]:
    """The task whose train split feeds demonstrations, and the dev split for selection.
    Without a dev file, a seeded quarter of train (at least 10 examples) becomes dev."""
    if not (prompt.templates and prompt.combine == "select_on_dev" and cell.template is None):
        return task, task.split("dev")
    if task.split("dev"):
        return task, task.split("dev")
    import random

    train = list(task.split("train"))
    n_dev = max(MIN_CARVED_DEV, len(train) // 4)
    if len(train) - n_dev < max(prompt.shots, 1):
        raise TaskfitError(
            f"runs.{cell.run}.prompt.combine: `select_on_dev` needs a dev split. Add `task.data.dev`, or give the "
            f"train split at least {n_dev + max(prompt.shots, 1)} examples so that {n_dev} can be held out "
            f"(it has {len(train)})."
        )
    random.Random(cell.seed).shuffle(train)
    dev, rest = train[:n_dev], train[n_dev:]
    return replace(task, splits={**task.splits, "train": rest, "dev": dev}), dev


def generation_chunk(samples: int) -> int:
    """Examples per chunk of a generating strategy that draws `samples` per example."""
    return max(CHUNK, GENERATION_SEQUENCES // samples)


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (a lazy test split is read one chunk at a time)."""
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _text_chunks(examples: Iterable[Example], chars: int, most: int) -> Iterator[list[Example]]:
    """Consecutive lists of examples, each closed before its field text would pass `chars`
    characters or its length `most` (an example longer than `chars` is a chunk of its own)."""
    chunk: list[Example] = []
    size = 0
    for ex in examples:
        n = sum(len(str(v)) for v in ex.fields.values())
        if chunk and (size + n > chars or len(chunk) == most):
            yield chunk
            chunk, size = [], 0
        chunk.append(ex)
        size += n
    if chunk:
        yield chunk
