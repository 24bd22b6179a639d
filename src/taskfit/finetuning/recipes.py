"""Fine-tuning recipes, one per task type, each with the same plain shape:

    setup (data, model, adapters) → train (Trainer, resumable) → evaluate (test predictions)
    → save (merge with a check, export, tidy up)

Every step that two recipes could both need lives in `common`, `training` or `data`.

On disk, in the job's folder: `checkpoints/` while training (the best and the latest; the
same job started again resumes from the latest, a changed job starts over) and `model/`,
the exported model (LoRA merged in), a plain transformers folder. The checkpoints are
removed once the model is exported; if the export fails they stay, adapter included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from taskfit.errors import TaskfitError
from taskfit.finetuning import FinetuneJob, FinetuneResult, common, data, training


def run(job: FinetuneJob) -> FinetuneResult:
    recipe = RECIPES.get(job.task.type)
    if recipe is None:
        raise TaskfitError(f"{job.where}: fine-tuning for {job.task.type} tasks is not available yet")
    return recipe(job)


def classification(job: FinetuneJob) -> FinetuneResult:
    """Sequence classification: encoders read [CLS], decoder LMs their last real token."""
    from transformers import AutoModelForSequenceClassification as Auto

    labels = list(job.task.labels)
    head = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {n: i for i, n in enumerate(labels)},
    }
    # setup
    prepared = common.prepare(job, Auto, "SEQ_CLS", stratify=data.dev_strata(job.task), **head)
    splits = {"train": prepared.train, "dev": prepared.dev, "test": job.test}
    inputs = {split: [data.input_parts(job.task, ex, job.where) for ex in exs] for split, exs in splits.items()}
    features, truncated = _features(prepared, splits, inputs)
    # train
    tokenizer = prepared.loaded.tokenizer
    trainer, stats = training.train(
        job, prepared.model, tokenizer, features["train"], features["dev"], _accuracy, prepared.loaded.identity
    )
    # evaluate
    final, merge_diff = common.final_model(job, trainer, prepared, probe=features["dev"] + features["test"])
    logits, shares = common.predict_test_logits(job, final, features["test"], trainer.data_collator)
    rows = _rows(job, labels, logits, inputs["test"])
    # save
    info = common.info(job, trainer, prepared, stats, final, merge_diff, shares)
    info.update(truncated_inputs=truncated, model_folder=str(common.save(job, trainer, final, tokenizer)))
    return FinetuneResult(rows=rows, info=info)


def _features(prepared: common.Prepared, splits: dict, inputs: dict) -> tuple[dict[str, list[dict]], int]:
    """Token ids per split (unpadded); train and dev carry the gold label index as `labels`."""
    features, truncated = {}, 0
    for split, examples in splits.items():
        features[split], cut = data.tokenize(prepared.loaded.tokenizer, inputs[split], prepared.max_length)
        truncated += cut
        if split != "test":
            for feature, ex in zip(features[split], examples):
                feature["labels"] = ex.gold
    return features, truncated


def _accuracy(eval_pred: Any) -> dict[str, float]:
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(eval_pred.label_ids)).mean())}


def _rows(job: FinetuneJob, labels: list[str], logits: torch.Tensor, inputs: list[data.Parts]) -> list[dict]:
    """Prediction rows like a prompt run's; `scores` are the head's logits, in label order."""
    probabilities = torch.softmax(logits, dim=-1) if len(logits) else logits
    rows = []
    for i, ex in enumerate(job.test):
        predicted = int(logits[i].argmax())
        rows.append(
            {
                "id": ex.id,
                "label": ex.gold_text,
                "prediction": labels[predicted],
                "correct": predicted == ex.gold,
                "scores": logits[i].tolist(),
                "probabilities": probabilities[i].tolist(),
                "prompt": data.prompt_of(inputs[i]),
            }
        )
    return rows


def _multiple_choice(job: FinetuneJob) -> FinetuneResult:
    """Encoders get a multiple-choice head; decoder LMs learn the gold option as the
    continuation of the prompt template and are scored like a prompted model."""
    from taskfit.finetuning import causal
    from taskfit.finetuning import multiple_choice as mc
    from taskfit.models.registry import resolve

    return mc.multiple_choice(job) if mc.is_encoder(resolve(job.model.name).path) else causal.multiple_choice(job)


def _generation(job: FinetuneJob) -> FinetuneResult:
    from taskfit.finetuning import causal

    return causal.generation(job)


def _token_classification(job: FinetuneJob) -> FinetuneResult:
    from taskfit.finetuning.token_classification import token_classification

    return token_classification(job)


RECIPES: dict[str, Callable[[FinetuneJob], FinetuneResult]] = {
    "classification": classification,
    "multiple_choice": _multiple_choice,
    "generation": _generation,
    "token_classification": _token_classification,
}
