"""Resuming a fine-tuning run on a tiny encoder built from a config: a checkpoint cut short by a
kill, a changed precision or device, the cost of a resumed run, and a best checkpoint that only
tied the untrained model."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers.finetune import PRECISION, SETTINGS, job_from_spec, killed_after_first_checkpoint, one_thread  # noqa: F401  (autouse fixture)
from helpers.tiny_encoder import build_tiny_encoder
from taskfit.finetuning import FinetuneJob, training
from taskfit.finetuning.recipes import run

LORA = SETTINGS["lora"]
"""48 train examples, 8 a batch, 12 epochs: 72 steps, evaluated and checkpointed every 6 steps."""
WORDS = {"positive": ["good", "great", "nice"], "negative": ["bad", "terrible", "awful"]}
NOUNS = "food service room staff movie book film show meal trip".split()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    rng = random.Random(0)
    for split, n in (("train", 64), ("test", 16)):
        rows = []
        for i in range(n):
            label = ["negative", "positive"][i % 2]
            text = f"the {rng.choice(NOUNS)} was {rng.choice(WORDS[label])}"
            rows.append({"id": f"{split}{i}", "text": text, "label": label})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_tiny_encoder(root / "encoder")
    return root


def make_job(root: Path, folder: str, dtype: str = PRECISION, device: str = "auto", **finetune) -> FinetuneJob:
    task = {"type": "classification", "data": {"train": "train.jsonl", "test": "test.jsonl"}, "dev_fraction": 0.25}
    return job_from_spec(root, folder, task, finetune, root / "encoder", dtype, device)


@pytest.fixture(scope="module")
def uninterrupted(root):
    result = run(make_job(root, "uninterrupted", **LORA))
    assert result.info["best_dev_accuracy"] >= 0.85  # it learns: resumed rows that match it mean something
    return result


def _checkpoints(root: Path, folder: str) -> list[str]:
    return sorted(p.name for p in (root / folder / "checkpoints").glob("checkpoint-*"))


# ---- a checkpoint cut short --------------------------------------------------------------------


def test_a_checkpoint_cut_short_is_removed_and_the_latest_complete_one_resumed(root, uninterrupted, caplog):
    with killed_after_first_checkpoint():
        run(make_job(root, "cut-short", **LORA))
    checkpoints = root / "cut-short" / "checkpoints"
    assert _checkpoints(root, "cut-short") == ["checkpoint-6"]
    # Saves killed part-way: nothing written yet; all but the trainer state; the trainer state cut short.
    (checkpoints / "checkpoint-12").mkdir()
    shutil.copytree(checkpoints / "checkpoint-6", checkpoints / "checkpoint-18")
    (checkpoints / "checkpoint-18" / "trainer_state.json").unlink()
    shutil.copytree(checkpoints / "checkpoint-6", checkpoints / "checkpoint-240")
    state = checkpoints / "checkpoint-240" / "trainer_state.json"
    state.write_text(state.read_text()[:200])

    with caplog.at_level(logging.WARNING, logger="taskfit"):
        resumed = run(make_job(root, "cut-short", **LORA))
    assert resumed.info["resumed_from_step"] == 6
    assert resumed.info["evaluations"] == uninterrupted.info["evaluations"]
    assert resumed.rows == uninterrupted.rows
    removed = [r.getMessage() for r in caplog.records if "incomplete checkpoint" in r.getMessage()]
    assert sorted(Path(m.split(":")[0]).name for m in removed) == ["checkpoint-12", "checkpoint-18", "checkpoint-240"]


def test_resume_point_is_the_latest_complete_checkpoint_by_step(tmp_path):
    assert training.resume_point(tmp_path) is None
    for step, state in ((9, '{"global_step": 9}'), (10, '{"global_step": 10}'), (11, '{"global_st')):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert training.resume_point(tmp_path) == tmp_path / "checkpoints" / "checkpoint-10"  # 10 > 9, by number
    assert _checkpoints(tmp_path, "") == ["checkpoint-10", "checkpoint-9"]
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-10")
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-9")
    (tmp_path / "checkpoints" / "checkpoint-12").mkdir()
    assert training.resume_point(tmp_path) is None  # nothing complete: start over
    assert _checkpoints(tmp_path, "") == []


# ---- precision and device ----------------------------------------------------------------------


def test_a_checkpoint_of_another_precision_is_not_resumed(root, caplog):
    with killed_after_first_checkpoint():
        run(make_job(root, "precision", dtype="float32", **LORA))
    with caplog.at_level(logging.WARNING, logger="taskfit"):
        again = run(make_job(root, "precision", dtype="bfloat16", **LORA))
    assert again.info["resumed_from_step"] is None
    assert again.info["dtype"] == "bfloat16 autocast, float32 weights"
    assert any("checkpoints of a different job" in r.getMessage() for r in caplog.records)


def test_the_stamp_holds_the_precision_and_device_as_set_and_as_resolved(root, monkeypatch):
    from taskfit.models import hf

    def stamp(dtype: str = "auto", device: str = "auto") -> dict:
        return training.stamp(make_job(root, "stamp", dtype, device, **LORA), {"path": "x"}, [], [])

    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: True)
    native = stamp()
    assert native["precision"] == {"dtype": "auto", "bf16_autocast": True}
    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: False)
    assert stamp() != native  # `auto` resolved differently on this machine
    assert stamp("float32") != stamp("auto") != stamp("bfloat16")
    assert stamp(device="cpu") != stamp(device="auto")
    assert stamp(device="cpu")["device"] == {"device": "cpu", "trains_on": "cpu"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # `auto` would now train on a GPU
    assert stamp("float32")["device"] == {"device": "auto", "trains_on": "cuda"}


# ---- the cost of a resumed run -----------------------------------------------------------------


def test_a_resumed_run_records_the_time_and_tokens_of_the_whole_run(root, uninterrupted, monkeypatch):
    """The first part, up to its checkpoint, is made to take 1000 s longer on training's clock."""
    from transformers import Trainer

    clock = SimpleNamespace(offset=0.0)
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + clock.offset))
    save = Trainer._save_checkpoint

    def slow_save(self, *args, **kwargs):
        clock.offset += 1000
        return save(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", slow_save)
        with killed_after_first_checkpoint():
            run(make_job(root, "cost", **LORA))
    resumed = run(make_job(root, "cost", **LORA)).info
    assert resumed["resumed_from_step"] == 6
    assert resumed["train_tokens"] == uninterrupted.info["train_tokens"]
    assert 1000 < resumed["train_time_s"] < 1000 + 300
    assert resumed["train_tokens_per_s"] == pytest.approx(resumed["train_tokens"] / resumed["train_time_s"], abs=0.1)


# ---- a best checkpoint that only tied ----------------------------------------------------------


def test_a_kept_first_evaluation_that_later_ones_only_tied_is_warned_about(root, caplog):
    """Batches of 16: 3 steps, evaluated after each; warmup makes step 1's learning rate 0, and a
    vanishing rate leaves the dev accuracy where it was."""
    untrained = {**LORA, "batch_size": 16, "epochs": 1, "warmup_ratio": 0.5, "learning_rate": 1e-12}
    with caplog.at_level(logging.WARNING, logger="taskfit"):
        result = run(make_job(root, "tied", **untrained))
    assert [e["step"] for e in result.info["evaluations"]] == [1, 2, 3]
    assert len({e["accuracy"] for e in result.info["evaluations"]}) == 1
    assert result.info["merge_max_abs_diff"] == 0.0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    folder = str(root / "tied")
    assert any(m.startswith(folder) and "first evaluation's (step 1)" in m and "tied" in m for m in messages)
    assert any(m.startswith(folder) and "equals the starting model" in m for m in messages)


def _trainer(history: list[tuple[int, float]], best: int, factor=lambda step: 1.0) -> SimpleNamespace:
    log_history = [{"step": s, "epoch": 1.0, "eval_accuracy": a} for s, a in history]
    state = SimpleNamespace(log_history=log_history, best_global_step=best)
    return SimpleNamespace(state=state, lr_scheduler=SimpleNamespace(lr_lambdas=[factor]))


def test_a_unique_best_or_a_later_tie_is_not_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="taskfit"):
        training.warn_if_untrained(_trainer([(5, 0.5), (10, 0.9), (15, 0.9)], best=10), "accuracy", Path("cell"))
        training.warn_if_untrained(_trainer([(5, 0.9), (10, 0.5), (15, 0.8)], best=5), "accuracy", Path("cell"))
        warmup = _trainer([(1, 0.5), (2, 0.9)], best=2, factor=lambda step: step / 4)
        training.warn_if_untrained(warmup, "accuracy", Path("cell"))
    assert not caplog.records
    assert training.unchanged_until(_trainer([], 1, lambda step: step / 4), 1)
    assert not training.unchanged_until(_trainer([], 2, lambda step: step / 4), 2)
