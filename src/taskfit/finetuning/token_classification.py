"""Token classification fine-tuning (named entities, chunks, part of speech): a tag per word.

Same shape as the classification recipe (setup → train → evaluate → save), with
`AutoModelForTokenClassification` (encoders and decoder LMs alike). A sentence's words are
joined by spaces and tokenized as the running text the model was trained on (with a fast
tokenizer; a slow one gets `is_split_into_words=True`), and each token is mapped back to its
word by character offsets: byte-level BPE tokenizers (GPT-2, RoBERTa, Llama 3, SmolLM)
given words one by one would encode them as if each began a text ("fox" as f-o-x, not
"Ġfox"), or refuse. Each word's tag goes on its first sub-token, and
the other sub-tokens and the special tokens get -100 (no loss), so a word split into several
sub-tokens counts once. Predictions read the first sub-token's argmax and are written back
in the task's tag scheme (BIO, IO, IOBES or plain). The dev metric is seqeval's entity F1.

Words cut off by `max_length` are never seen by the model: they are predicted `O` and
counted in the manifest (`truncated_words`).
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any

import numpy as np
import torch

from taskfit.evaluation.token_metrics import scores_from_counts, sentence_counts
from taskfit.finetuning import FinetuneJob, FinetuneResult, common, data, training
from taskfit.tasks.token_classification import OUTSIDE, encode, spans, tags_of, task_scheme, tokens_of

IGNORE = -100
"""Label of positions without a loss: later sub-tokens of a word, special tokens, padding."""
METRIC = "entity_f1"


def token_classification(job: FinetuneJob) -> FinetuneResult:
    from transformers import AutoModelForTokenClassification as Auto
    from transformers import DataCollatorForTokenClassification

    tags = list(job.task.tags)
    scheme = task_scheme(job.task)
    head = {"num_labels": len(tags), "id2label": dict(enumerate(tags)), "label2id": {t: i for i, t in enumerate(tags)}}
    # setup
    cfg = job.task.config
    prepared = common.prepare(job, Auto, "TOKEN_CLS", stratify=data.dev_strata(job.task), **head)
    tokenizer = prepared.loaded.tokenizer
    splits = {"train": prepared.train, "dev": prepared.dev, "test": job.test}
    encoded = {
        s: encode_words(tokenizer, [tokens_of(ex, cfg) for ex in exs], prepared.max_length) for s, exs in splits.items()
    }
    features = {s: [f for f, _ in encoded[s]] for s in splits}
    for split in ("train", "dev"):
        index = head["label2id"]
        for feature, (_, word_ids), ex in zip(features[split], encoded[split], splits[split]):
            feature["labels"] = align_labels(word_ids, [index[t] for t in tags_of(ex, cfg)])
    # train
    collator = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)
    trainer, stats = training.train(
        job, prepared.model, tokenizer, features["train"], features["dev"], _entity_f1(tags, scheme),
        prepared.loaded.identity, metric=METRIC, collator=collator,
    )  # fmt: skip
    # evaluate
    final, merge_diff = common.final_model(job, trainer, prepared, probe=features["dev"] + features["test"])
    logits, shares = common.predict_test_logits(job, final, features["test"], collator)  # (N, L, tags)
    rows = _rows(job, tags, scheme, logits, [w for _, w in encoded["test"]])
    # save
    info = common.info(job, trainer, prepared, stats, final, merge_diff, shares)
    info.update(
        tag_scheme=scheme,
        truncated_inputs=sum(_truncation(encoded[s], splits[s], cfg)[0] for s in splits),
        truncated_test_words=_truncation(encoded["test"], job.test, cfg)[1],
        model_folder=str(common.save(job, trainer, final, tokenizer)),
    )
    return FinetuneResult(rows=rows, info=info)


def encode_words(tokenizer: Any, sentences: list[list[str]], max_length: int) -> list[tuple[dict, list]]:
    """(unpadded feature, word index of each position: None for special tokens) per sentence."""
    if not sentences:
        return []
    if not tokenizer.is_fast:  # no character offsets
        encoded = tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=max_length)
        word_ids = [encoded.word_ids(i) for i in range(len(sentences))]
    else:
        texts = [" ".join(words) for words in sentences]
        encoded = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
        word_ids = [_words_of(words, offsets) for words, offsets in zip(sentences, encoded["offset_mapping"])]
    names = [k for k in encoded if k in ("input_ids", "attention_mask", "token_type_ids")]
    return [({k: encoded[k][i] for k in names}, word_ids[i]) for i in range(len(sentences))]


def _words_of(words: list[str], offsets: list[tuple[int, int]]) -> list[int | None]:
    """The word each token of `" ".join(words)` ends in (None for special tokens, which span
    nothing). A token's last character decides: a leading space belongs to no word."""
    starts = list(itertools.accumulate((len(w) + 1 for w in words[:-1]), initial=0))
    return [None if start == end else bisect.bisect_right(starts, end - 1) - 1 for start, end in offsets]


def align_labels(word_ids: list[int | None], labels: list[int]) -> list[int]:
    """Each word's label on its first sub-token; -100 on later sub-tokens and special tokens."""
    out, seen = [], set()
    for word in word_ids:
        out.append(IGNORE if word is None or word in seen else labels[word])
        if word is not None:
            seen.add(word)
    return out


def first_positions(word_ids: list[int | None]) -> dict[int, int]:
    """Word index → position of its first sub-token, for the words that survived truncation."""
    first: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is not None:
            first.setdefault(word, position)
    return first


def in_scheme(tags: list[str], scheme: str) -> list[str]:
    """A predicted tag sequence decoded into entities and written again, well-formed, in `scheme`."""
    return encode(spans(tags), len(tags), scheme)


def _entity_f1(tags: list[str], scheme: str):
    """Dev metric: micro entity F1 (seqeval's) over the words the model saw."""

    def compute(eval_pred: Any) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predicted, labels = np.asarray(logits).argmax(-1), np.asarray(eval_pred.label_ids)  # (N, L) each
        gold, pred = [], []
        for p, g in zip(predicted, labels):
            keep = g != IGNORE
            gold.append([tags[i] for i in g[keep]])
            pred.append(in_scheme([tags[i] for i in p[keep]], scheme))
        scores = scores_from_counts(sentence_counts(gold, pred).sum(axis=0))
        return {METRIC: float(scores["entity_f1"]), "token_accuracy": float(scores["token_accuracy"])}

    return compute


def _rows(job: FinetuneJob, tags: list[str], scheme: str, logits: torch.Tensor, word_ids: list) -> list[dict]:
    """Prediction rows; words that truncation hid from the model are predicted `O`."""
    rows, cfg = [], job.task.config
    for i, ex in enumerate(job.test):
        words, gold = tokens_of(ex, cfg), tags_of(ex, cfg)
        first = first_positions(word_ids[i])
        raw = [tags[int(logits[i, first[w]].argmax())] if w in first else OUTSIDE for w in range(len(words))]
        predicted = in_scheme(raw, scheme)
        rows.append(
            {
                "id": ex.id,
                "tokens": list(words),
                "label": list(gold),
                "prediction": predicted,
                "correct": predicted == list(gold),
                "prompt": " ".join(words),
            }
        )
    return rows


def _truncation(encoded: list[tuple[dict, list]], examples: list, cfg: Any) -> tuple[int, int]:
    """(sentences cut by `max_length`, words lost to the cut)."""
    lost = [len(tokens_of(ex, cfg)) - len(first_positions(ids)) for (_, ids), ex in zip(encoded, examples)]
    return sum(n > 0 for n in lost), sum(lost)
