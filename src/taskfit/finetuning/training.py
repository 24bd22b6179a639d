"""The one Trainer set-up every recipe uses: arguments, evaluation schedule, resume, throughput.

Plain `transformers.Trainer` (no custom loop, no distribution code), so that
`accelerate launch -m taskfit run ...` spreads a run over several GPUs unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState

from taskfit.config import FinetuneConfig
from taskfit.finetuning.data import fingerprint

log = logging.getLogger(__name__)

MIN_EVALUATIONS = 4
"""Short runs evaluate (and checkpoint) at least this often, so that best-model selection and
early stopping have more than one or two points to choose from."""
STAMP = "taskfit-job.json"


def learning_rate(cfg: FinetuneConfig) -> float:
    """LoRA trains few, freshly initialised weights and tolerates a 10x larger rate than full fine-tuning."""
    if cfg.learning_rate is not None:
        return cfg.learning_rate
    return 5e-5 if cfg.method == "full" else 5e-4


def evaluation_interval(n_train: int, cfg: FinetuneConfig, processes: int = 1) -> int:
    """Optimizer steps between evaluations: once per epoch, more often on short runs."""
    per_epoch = max(1, math.ceil(n_train / (cfg.batch_size * cfg.gradient_accumulation * processes)))
    total = max(1, math.ceil(per_epoch * cfg.epochs))
    return max(1, min(per_epoch, math.ceil(total / MIN_EVALUATIONS)))


def uses_cpu(device: str) -> bool:
    return device == "cpu" or not torch.cuda.is_available()


def mixed_precision(model: Any) -> bool:
    """bf16 autocast (float32 master weights) where `model.dtype` resolves to bfloat16: `auto` on a
    GPU or a CPU that computes bf16 natively (~1.5x faster LoRA steps on this project's CPU)."""
    from taskfit.models.hf import pick_precision

    return pick_precision(model.dtype, "cpu" if uses_cpu(model.device) else "cuda").compute == torch.bfloat16


def autocast(model: Any) -> Any:
    """The autocast context that training used, for predictions after it (off for float32)."""
    return torch.autocast("cpu" if uses_cpu(model.device) else "cuda", torch.bfloat16, enabled=mixed_precision(model))


def processes(device: str) -> Any:
    """accelerate's view of the processes of this run (several under `accelerate launch`/torchrun).

    `cpu=` must match what the Trainer will use: without it, CPU processes do not see each other."""
    from accelerate import PartialState

    return PartialState(cpu=uses_cpu(device))


def across_processes(items: Sequence, predict: Callable[[list], list], device: str) -> tuple[list, list[int]]:
    """`predict` (a list of results per list of items) over `items`, shared by the processes of a
    multi-process launch, each predicting every n-th item (they all hold the same final model):
    every process gets all results back, in input order, and how many each predicted. One
    process: `predict(items)`."""
    items, state = list(items), processes(device)  # a lazily read test split becomes a list once
    n = state.num_processes
    if n == 1:
        results = predict(items)
        return results, [len(results)]
    from accelerate.utils import gather_object

    parts = gather_object([predict(items[state.process_index :: n])])  # one list per process, in rank order
    results = [None] * len(items)
    for rank, part in enumerate(parts):
        results[rank::n] = part
    return results, [len(part) for part in parts]


def arguments(folder: Path, cfg: FinetuneConfig, seed: int, n_train: int, model: Any, metric: str):
    """`model` is the run's ModelConfig (device, dtype)."""
    every = evaluation_interval(n_train, cfg, processes(model.device).num_processes)
    return TrainingArguments(
        output_dir=str(folder / "checkpoints"),
        num_train_epochs=cfg.epochs,
        learning_rate=learning_rate(cfg),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps (transformers 5)
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.scheduler,
        eval_strategy="steps",
        eval_steps=every,
        save_strategy="steps",  # checkpoints must coincide with evaluations for load_best_model_at_end
        save_steps=every,
        logging_steps=every,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=True,
        save_total_limit=2,  # the best and the latest: enough to resume and to pick the best
        seed=seed,
        data_seed=seed,
        report_to=[],
        use_cpu=uses_cpu(model.device),
        bf16=mixed_precision(model),
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length",  # batches of similar lengths: less padding per batch
        include_num_input_tokens_seen="non_padding",
        label_names=["labels"],
    )


@dataclass
class TrainStats:
    seconds: float
    """Training time of the whole run: a resumed run adds the time its earlier part took up to the
    checkpoint it resumed from (work done after that checkpoint and lost is not counted), so that
    its cost is an uninterrupted run's."""
    tokens: int
    """Non-padding input tokens fed to the model over the whole run, across interruptions."""
    resumed_from_step: int | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _Throughput(TrainerCallback, ExportableState):
    """Time and tokens of the whole run, across interruptions.

    The Trainer writes each `ExportableState` callback's `state()` into the trainer state of every
    checkpoint, so the seconds trained so far are saved with the checkpoint they belong to (in its
    last file, see `complete`); a resumed run reads them back. Tokens are the Trainer's own count,
    restored with its state."""

    def __init__(self):
        self.before, self.start, self.step0 = 0.0, None, 0

    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def state(self) -> dict:
        return {"args": {}, "attributes": {"seconds_trained": self.elapsed()}}

    def on_train_begin(self, args, state, control, **kwargs):
        # `state` is a resumed checkpoint's by now; a fresh run's holds this callback's initial 0 s.
        saved = state.stateful_callbacks.get(type(self).__name__)
        self.before = float(saved.get("attributes", {}).get("seconds_trained", 0.0)) if isinstance(saved, dict) else 0.0
        self.start, self.step0 = time.perf_counter(), state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = self.elapsed()
        self.tokens = state.num_input_tokens_seen


class AnswerLossTrainer(Trainer):
    """A causal LM's training loss from the LM head at the labelled positions only.

    The model's own forward runs the head over every position and upcasts those (B, T, V)
    logits to float32 for the loss, though only the answer tokens carry labels (a news
    article's headline: ~3% of its positions). Training steps here run the body, pick the
    hidden states whose next token is labelled, and run the head on those alone: the same
    loss (sum over labelled tokens / the Trainer's token count, as transformers computes it).
    Evaluation, and a model wrapped for several processes (whose forward must run), take
    the Trainer's own path."""

    def __init__(self, *args, eval_collator: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        """Batches for evaluation where training packs: one answer per row, so that the dev
        metric sees each answer once and in order, on any number of processes (a packed last
        batch, padded with repeated examples across processes, cannot be trimmed back)."""

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training or model is not self.model:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return answer_loss(model, inputs, num_items_in_batch, bf16=self.args.bf16)


def answer_loss(model: Any, inputs: dict[str, Any], num_items_in_batch=None, bf16: bool = False) -> torch.Tensor:
    """Cross-entropy of the labelled next tokens, the head run only where a label follows."""
    from taskfit.models.scoring import output_transform

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    labels = inputs["labels"][:, 1:]
    keep = labels != -100
    features = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.autocast(inner.device.type, torch.bfloat16, enabled=bf16):
        hidden = inner.base_model(**features).last_hidden_state[:, :-1][keep]  # (N, d)
        logits = output_transform(inner)(inner.get_output_embeddings()(hidden))
    loss = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / count


def make_trainer(
    job: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    train: list[dict],
    dev: list[dict],
    compute_metrics: Callable,
    metric: str = "accuracy",
    collator: Any = None,
    preprocess_logits: Callable | None = None,
    trainer_class: Callable[..., Trainer] = Trainer,
) -> Trainer:
    """A Trainer on tokenized, unpadded features (lists of dicts with `labels`); padded per batch.

    `preprocess_logits(logits, labels)` shrinks each eval batch's logits before they are gathered
    (a causal LM's (B, T, V) logits over a whole dev split would not fit in memory).
    `trainer_class`: a Trainer with the recipe's own loss (`AnswerLossTrainer`, ...)."""
    args = arguments(job.folder, job.config, job.seed, len(train), job.model, metric)
    callbacks: list[TrainerCallback] = [_Throughput()]
    if job.config.early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=job.config.early_stopping))
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        processing_class=tokenizer,
        data_collator=collator or DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        preprocess_logits_for_metrics=preprocess_logits,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the run's own progress is enough
    return trainer


def prepare_checkpoints(folder: Path, stamp: dict[str, Any], device: str = "auto") -> bool:
    """Whether `folder/checkpoints` holds checkpoint folders of this very job (complete or not:
    `resume_point` picks the one to resume from).

    Checkpoints of a different job (config, data, model, precision or device changed) are removed:
    resuming them would silently mix two runs. Under `accelerate launch` the main process decides."""
    checkpoints = folder / "checkpoints"
    stamp_file = checkpoints / STAMP
    state = processes(device)
    if state.is_main_process:
        if checkpoints.exists() and not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp):
            log.warning("%s: checkpoints of a different job; starting over", checkpoints)
            shutil.rmtree(checkpoints)
        checkpoints.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(json.dumps(stamp, indent=1))
    state.wait_for_everyone()
    return any(p.is_dir() for p in checkpoints.glob("checkpoint-*"))


def complete(checkpoint: Path) -> bool:
    """Whether the Trainer finished saving `checkpoint`: `Trainer._save_checkpoint` writes the
    trainer state (trainer_state.json) last, after the weights, optimizer, scheduler and RNG states,
    so a save killed part-way leaves a folder without it, or with it cut short."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def resume_point(folder: Path, device: str = "auto") -> Path | None:
    """The latest complete checkpoint in `folder/checkpoints`, or None (start over).

    A run killed while the Trainer saved leaves its newest checkpoint incomplete; the Trainer's own
    choice (the latest folder) would then fail on every re-run ("Can't find a valid checkpoint").
    Incomplete checkpoints are removed (by the main process, under `accelerate launch`)."""
    found = [p for p in (folder / "checkpoints").glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    state = processes(device)
    if state.is_main_process:
        for path in found:
            if path.is_dir() and not complete(path):
                log.warning("%s: incomplete checkpoint (the run stopped while saving it); removing it", path)
                shutil.rmtree(path)
    state.wait_for_everyone()
    done = [p for p in found if p.is_dir() and complete(p)]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def stamp(job: Any, identity: dict[str, Any], train_set: list[dict], dev_set: list[dict]) -> dict[str, Any]:
    """What makes two runs the same job, so that a checkpoint is resumed only by its own job: the
    finetune config, seed, model, data, and the precision and device it trains with (as set and as
    resolved: `auto` differs between machines)."""
    return {
        "config": job.config.model_dump(mode="json"),
        "seed": job.seed,
        "model": identity,
        "data": fingerprint(train_set, dev_set),
        "precision": {"dtype": job.model.dtype, "bf16_autocast": mixed_precision(job.model)},
        "device": {"device": job.model.device, "trains_on": "cpu" if uses_cpu(job.model.device) else "cuda"},
    }


def train(
    job: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    train_set: list[dict],
    dev_set: list[dict],
    compute_metrics: Callable,
    identity: dict[str, Any],
    metric: str = "accuracy",
    collator: Any = None,
    preprocess_logits: Callable | None = None,
    trainer_class: Callable[..., Trainer] = Trainer,
) -> tuple[Trainer, TrainStats]:
    """Train on the features, resuming this job's latest checkpoint if there is one; on return
    the Trainer's model holds the best checkpoint by the dev `metric`."""
    # before the Trainer: it creates its output folder
    prepare_checkpoints(job.folder, stamp(job, identity, train_set, dev_set), job.model.device)
    checkpoint = resume_point(job.folder, job.model.device)
    trainer = make_trainer(
        job, model, tokenizer, train_set, dev_set, compute_metrics, metric, collator, preprocess_logits, trainer_class
    )
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    throughput = next(c for c in trainer.callback_handler.callbacks if isinstance(c, _Throughput))
    stats = TrainStats(throughput.seconds, int(throughput.tokens), throughput.step0 if checkpoint else None)
    if trainer.is_world_process_zero():
        warn_if_untrained(trainer, metric, job.folder)
    return trainer, stats


def warn_if_untrained(trainer: Trainer, metric: str, folder: Path) -> None:
    """Warn where the model kept may be (barely) trained: the Trainer keeps the earliest of tied
    checkpoints (a later one must beat the best strictly; transformers has no setting to prefer the
    later one), which can be the first evaluation's, and warmup can leave that one untouched."""
    history = evaluations(trainer, metric)
    best = trainer.state.best_global_step
    if not history or best is None:
        return
    first = history[0]
    if best == first["step"] and any(e[metric] == first[metric] for e in history[1:]):
        tied = f"later evaluations only tied its dev {metric} ({first[metric]:g}), and ties keep the earliest"
        log.warning(
            f"{folder}: the model kept is the first evaluation's (step {best}): {tied} checkpoint. Train longer "
            "or with a larger learning rate, or use a larger dev split (ties are likelier on a small one)."
        )
    if unchanged_until(trainer, best):
        log.warning(
            f"{folder}: the model kept (step {best}) equals the starting model: the learning rate was 0 on "
            "every step up to it (warmup), so the exported weights are the base model's. Lower `warmup_ratio` "
            "or train longer."
        )


def unchanged_until(trainer: Trainer, step: int) -> bool:
    """Whether optimizer steps 1..`step` all ran at learning rate 0 (so the weights did not move):
    step k uses the scheduler's factor for k-1. False where the scheduler's factors are unknown."""
    scheduler = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)  # accelerate wraps it
    factors = getattr(scheduler, "lr_lambdas", None)  # LambdaLR: every schedule `scheduler` offers
    return bool(factors) and all(factor(k) == 0 for factor in factors for k in range(step))


def remove_checkpoints(folder: Path) -> None:
    """After a successful export the checkpoints only take disk space (a full-model checkpoint
    holds the weights and twice their size in optimizer state)."""
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def evaluations(trainer: Trainer, metric: str) -> list[dict[str, float]]:
    """The dev metric and loss at each evaluation, for the manifest (a learning curve)."""
    key = f"eval_{metric}"
    return [
        {"step": e["step"], "epoch": round(e.get("epoch", 0.0), 4), metric: e[key], "loss": e.get("eval_loss")}
        for e in trainer.state.log_history
        if key in e
    ]
