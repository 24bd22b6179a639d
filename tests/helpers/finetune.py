"""Shared settings for fine-tuning tests on tiny models."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

FAST = {"batch_size": 8, "warmup_ratio": 0.0, "weight_decay": 0.0, "early_stopping": None}
"""No warmup, decay or early stopping: tiny toy tasks learn in a few exact, fast epochs."""
SETTINGS = {
    "full": {**FAST, "epochs": 12, "method": "full", "learning_rate": 0.003},
    "lora": {**FAST, "epochs": 12, "method": "lora", "learning_rate": 0.03, "r": 4},
}

PRECISION = "float32"
"""`model.dtype` of the recipe tests: exact arithmetic, and toy tasks whose few epochs do not ride on
bf16 rounding (bf16 autocast has its own test in test_finetune_classification.py)."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine torch's spinning threads cost 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Killed(Exception):
    """Stands in for the process being killed."""


@contextlib.contextmanager
def killed_after_first_checkpoint():
    """Inside, the Trainer dies right after saving its first checkpoint (the body must raise Killed);
    saving is normal again after the block, so the same job can then resume."""
    from transformers import Trainer

    save = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise Killed

    Trainer._save_checkpoint = save_then_die
    try:
        with pytest.raises(Killed):
            yield
    finally:
        Trainer._save_checkpoint = save


def run_on_two_processes(folder, spec: dict):
    """`taskfit run` of `spec` (written to folder/mp.yaml) under torchrun with 2 CPU processes,
    output in folder/out; the finished process (its return code checked)."""
    import json
    import os
    import subprocess
    import sys

    (folder / "mp.yaml").write_text(json.dumps(spec))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, "-m", "taskfit", "run", "mp.yaml", "--out", "out"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def job_from_spec(root: Path, folder: str, task: dict, finetune: dict, model: Path, dtype: str = PRECISION,
                  device: str = "auto"):  # fmt: skip
    """A FinetuneJob as a run builds it, from an experiment file written to `root` (one run `ft`,
    seed 0, the whole test split) with `task` and `finetune` settings; its folder is `root/folder`."""
    from taskfit.config import ModelConfig, load_experiment
    from taskfit.finetuning import FinetuneJob
    from taskfit.tasks import load_task

    path = root / f"exp-{folder}.yaml"
    path.write_text(json.dumps({"name": "ft", "task": task, "runs": {"ft": {"finetune": finetune}}}))  # JSON is YAML
    experiment = load_experiment(path)
    loaded = load_task(experiment)
    return FinetuneJob(
        task=loaded,
        config=experiment.config.runs["ft"].finetune,
        model=ModelConfig(name=str(model), dtype=dtype, device=device),
        seed=0,
        test=loaded.split("test"),
        folder=root / folder,
        where="runs.ft.finetune",
    )
