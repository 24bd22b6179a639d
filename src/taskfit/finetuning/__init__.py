"""Fine-tuning runs: recipes per task type (setup → train → evaluate → save), LoRA through
peft merged into the weights for deployment, on Hugging Face `Trainer`/accelerate.

The contract with the experiment: a `FinetuneJob` in, a `FinetuneResult` out, whose rows
have the same shape as a prompt run's predictions so that metrics, compare and report
treat both routes alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskfit.config import FinetuneConfig, ModelConfig
from taskfit.data import Example
from taskfit.tasks import Task


@dataclass
class FinetuneJob:
    task: Task
    """Its train split is what to train on (already the `train_size` subset); dev may be empty."""
    config: FinetuneConfig
    model: ModelConfig
    seed: int
    test: Sequence[Example]
    """The examples to predict after training."""
    folder: Path
    """The cell folder: checkpoints in `checkpoints/`, the exported model in `model/`."""
    where: str = ""
    """Config path of the run (`runs.<name>.finetune`) for error messages."""


@dataclass
class FinetuneResult:
    rows: list[dict[str, Any]]
    """Prediction rows like a prompt run's: id, label, prediction, correct, scores, probabilities, prompt."""
    info: dict[str, Any] = field(default_factory=dict)
    """For the manifest: trainable/total parameters, train time, tokens/s, peak memory, merge check, ..."""


def run_finetune(job: FinetuneJob) -> FinetuneResult:
    """Dispatch to the recipe of the task type."""
    from taskfit.finetuning import recipes

    return recipes.run(job)
