"""Multiple-choice fine-tuning for encoders (BERT, RoBERTa, DeBERTa...): `AutoModelForMultipleChoice`.

Same shape as the classification recipe (setup → train → evaluate → save). Each example's
context (its text fields but the options, label and id; or `task.input`) is encoded once per
option as a text pair (context, option); the head gives one logit per option and a softmax
over the options is trained with cross-entropy. The dev metric is accuracy.

Decoder LMs have no multiple-choice head in transformers: they answer multiple choice by
the log-likelihood of each option, and are trained as causal LMs in their own recipe.

A batch's examples may have different numbers of options: the shorter ones are filled with
empty pairs, which `ChoiceTrainer` keeps out of the softmax (loss and dev accuracy alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from taskfit.errors import TaskfitError
from taskfit.finetuning import FinetuneJob, FinetuneResult, common, data, training
from taskfit.models.registry import resolve

FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def is_encoder(model_path: str) -> bool:
    """Whether transformers has a multiple-choice head for the model's architecture (encoders do,
    decoder LMs such as Llama, Qwen or GPT-2 do not)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES

    return AutoConfig.from_pretrained(model_path).model_type in MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES


def multiple_choice(job: FinetuneJob) -> FinetuneResult:
    from transformers import AutoModelForMultipleChoice as Auto

    _require_encoder(job)
    # setup
    prepared = common.prepare(job, Auto, "SEQ_CLS", stratify=data.dev_strata(job.task))
    tokenizer = prepared.loaded.tokenizer
    splits = {"train": prepared.train, "dev": prepared.dev, "test": job.test}
    contexts = {s: [context_of(job, ex) for ex in exs] for s, exs in splits.items()}
    features, truncated = {}, 0
    for split, examples in splits.items():
        features[split], cut = encode_choices(tokenizer, contexts[split], examples, prepared.max_length)
        truncated += cut
        if split != "test":
            for feature, ex in zip(features[split], examples):
                feature["labels"] = ex.gold
    # train
    trainer, stats = training.train(
        job, prepared.model, tokenizer, features["train"], features["dev"], _accuracy, prepared.loaded.identity,
        collator=ChoiceCollator(tokenizer, mark_fillers=True), trainer_class=ChoiceTrainer,
    )  # fmt: skip
    # evaluate
    collator = ChoiceCollator(tokenizer)  # the model's own inputs only: test rows read their own options
    final, merge_diff = common.final_model(job, trainer, prepared, features["dev"] + features["test"], collator)
    logits, shares = common.predict_test_logits(job, final, features["test"], collator)  # (N, max options)
    rows = _rows(job, logits, contexts["test"])
    # save
    info = common.info(job, trainer, prepared, stats, final, merge_diff, shares)
    info.update(truncated_inputs=truncated, model_folder=str(common.save(job, trainer, final, tokenizer)))
    return FinetuneResult(rows=rows, info=info)


def _require_encoder(job: FinetuneJob) -> None:
    if not is_encoder(resolve(job.model.name).path):
        raise TaskfitError(
            f"{job.where}: '{job.model.name}' is a decoder LM, which has no multiple-choice head; "
            "decoder multiple choice is fine-tuned as a causal LM on the gold option (the causal-LM recipe), "
            "and scored by each option's log-likelihood. Use an encoder (BERT, RoBERTa, DeBERTa) for this recipe."
        )


def context_of(job: FinetuneJob, example: Any) -> str:
    """The text every option is paired with: `task.input`, else the text fields but options, label and id."""
    choices = job.task.config.choices
    option_fields = choices if isinstance(choices, list) else [choices]
    return data.prompt_of(data.input_parts(job.task, example, job.where, skip=option_fields))


def encode_choices(tokenizer: Any, contexts: list[str], examples: list, max_length: int) -> tuple[list[dict], int]:
    """Per example, one (context, option) encoding per option: {"input_ids": [[...] per option], ...}.

    Returns the features and how many examples had an option pair cut to `max_length`."""
    features, truncated = [], 0
    for context, ex in zip(contexts, examples):
        pairs = ([context] * len(ex.options), list(ex.options))
        full = tokenizer(*pairs, truncation=False, verbose=False)["input_ids"]
        encoded = tokenizer(*pairs, truncation=True, max_length=max_length)
        truncated += any(len(ids) > max_length for ids in full)
        features.append({k: encoded[k] for k in FIELDS if k in encoded})
    return features, truncated


@dataclass
class ChoiceCollator:
    """Pads a batch of examples to a (N, choices, L) tensor per field (right padding).

    Examples with fewer options than the batch's most are filled with empty (context, option)
    pairs; their logits are never read for predictions (rows keep each example's own options).
    `mark_fillers`: also a (N, choices) boolean `choice_mask`, true for real options, which
    `ChoiceTrainer` takes out before the model sees the batch."""

    tokenizer: Any
    mark_fillers: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        choices = max(len(f["input_ids"]) for f in features)
        filler = self.tokenizer("", "")
        names = [k for k in FIELDS if k in features[0]]
        flat = []
        for f in features:
            n = len(f["input_ids"])
            flat += [{k: f[k][j] if j < n else filler[k] for k in names} for j in range(choices)]
        batch = self.tokenizer.pad(flat, padding=True, return_tensors="pt")
        out = {k: v.view(len(features), choices, -1) for k, v in batch.items()}
        if "labels" in features[0]:
            out["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        if self.mark_fillers:
            out["choice_mask"] = torch.tensor([[j < len(f["input_ids"]) for j in range(choices)] for f in features])
        return out


class ChoiceTrainer(Trainer):
    """Cross-entropy over each example's own options: filler options (see `ChoiceCollator`) get
    the lowest logit, so they take no probability in the loss and are never the dev argmax.
    (The model's own loss would spread the softmax over the fillers too.)"""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, real = inputs.pop("labels", None), inputs.pop("choice_mask", None)
        outputs = model(**inputs)
        if real is not None:
            outputs.logits = outputs.logits.masked_fill(~real, torch.finfo(outputs.logits.dtype).min)
        loss = None
        if labels is not None:  # per example; over the Trainer's count when it accumulates steps
            loss = torch.nn.functional.cross_entropy(outputs.logits.float(), labels, reduction="sum")
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else len(labels))
        return (loss, outputs) if return_outputs else loss


def _accuracy(eval_pred: Any) -> dict[str, float]:
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(eval_pred.label_ids)).mean())}


def _rows(job: FinetuneJob, logits: torch.Tensor, contexts: list[str]) -> list[dict]:
    """Rows like a prompt run's multiple-choice rows: gold and predicted option indices, a score per option."""
    rows = []
    for i, ex in enumerate(job.test):
        scores = logits[i, : len(ex.options)]
        predicted = int(scores.argmax())
        rows.append(
            {
                "id": ex.id,
                "label": ex.gold,
                "prediction": predicted,
                "correct": predicted == ex.gold,
                "scores": scores.tolist(),
                "probabilities": torch.softmax(scores, dim=-1).tolist(),
                "prompt": contexts[i],
            }
        )
    return rows
