"""Recipes for decoder (causal) LMs: generation SFT and multiple choice, with the shape of the
classification recipe (setup → train → evaluate → save).

Both train on `prompt + answer` with the loss on the answer tokens only (labels -100 on the
prompt). The prompt is `finetune.template` rendered with the example, as in prompting, so a
fine-tuned model reads what a prompted one would. Pairs are tokenized as the scorer
(`taskfit.models.hf.encode_pairs`, after lm-evaluation-harness) does: trailing spaces of the prompt move
into the answer, and no special tokens are added; so training, generation and scoring agree.

Dev metric (both recipes): `token_accuracy`, the share of answer tokens that are the greedy
(argmax) token under teacher forcing, computed from the Trainer's eval pass on the dev split.
It is cheap (no decoding) and an answer with all its tokens right is exactly what greedy
decoding produces; `exact_match` (all tokens right) is logged next to it.

Generation examples with several acceptable references train on each of them (one pair per
reference), and dev scores each of them: an example counts with its best-predicted reference
(as the test metrics take the best reference), so a model that learned another acceptable
answer is not marked down for it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from taskfit.data import Example
from taskfit.errors import TaskfitError
from taskfit.evaluation.text_metrics import is_exact
from taskfit.finetuning import FinetuneJob, FinetuneResult, common, data, training
from taskfit.models.hf import encode_pairs
from taskfit.prompting.template import Rendered, Template

log = logging.getLogger(__name__)

METRIC = "token_accuracy"
MARGIN_TOKENS = 8
"""Generation: new tokens allowed beyond the longest training answer."""
MIN_PROMPT_TOKENS = 8
"""What `max_length` must leave a test prompt beside the answer's room (a prompt cut shorter
than its training prompts is cut from the left, with a warning)."""
MC_DEFAULT = "Question: {{ question }}\nAnswer: {{ answer }}"
PACKING_CHECK_INPUTS = 4


@dataclass
class Pair:
    prompt: str
    """The text before the answer (chat-wrapped when `chat: true`), as the model reads it."""
    answer: str
    """What is trained on: the answer (plus the template's text after it)."""


def generation(job: FinetuneJob) -> FinetuneResult:
    """Supervised fine-tuning on prompt → target; test predictions by greedy decoding."""
    from transformers import AutoModelForCausalLM

    # setup
    prepared = common.prepare(job, AutoModelForCausalLM, "CAUSAL_LM", stratify=data.dev_strata(job.task))
    tokenizer = prepared.loaded.tokenizer
    prompter = Prompter(job, tokenizer)
    pairs = {  # every reference
        "train": [pair for ex in prepared.train for pair in prompter.pairs(ex)],
        "dev": [pair for ex in prepared.dev for pair in prompter.pairs(ex)],
    }
    owners = [i for i, ex in enumerate(prepared.dev) for _ in ex.options]  # dev pair -> its example
    features, truncated = {}, 0
    for split, ps in pairs.items():
        features[split], cut = encode_all(tokenizer, ps, prepared.max_length, eos=True, joint=False)
        truncated += cut
    masked = masked_example(tokenizer, features["train"][0])
    max_new = _room_for_answers(job, features["train"], prepared.max_length)
    # train
    trainer, stats, packing = _train(job, prepared, features, best_reference_metrics(owners))
    # evaluate
    final, merge_diff = common.final_model(
        job, trainer, prepared, features["dev"] + features["train"], padding_collator(tokenizer)
    )
    multi_line = any("\n" in option for ex in prepared.train for option in ex.options)
    rows, shares = _generate(job, prompter, final, tokenizer, prepared.max_length, max_new, multi_line)
    # save
    info = {**_info(job, trainer, prepared, stats, final, merge_diff, shares, truncated, masked), **packing}
    info.update(
        train_pairs=len(pairs["train"]),
        dev_pairs=len(pairs["dev"]),
        max_new_tokens=max_new,
        model_folder=str(common.save(job, trainer, final, tokenizer)),
    )
    return FinetuneResult(rows=rows, info=info)


def multiple_choice(job: FinetuneJob) -> FinetuneResult:
    """Train on the correct option as the continuation of the prompt; predict with the prompting
    scorer (`HFLM.loglikelihood`), so the fine-tuned model is evaluated like a prompted one."""
    from transformers import AutoModelForCausalLM

    from taskfit.models.hf import HFLM, pick_precision

    prepared = common.prepare(job, AutoModelForCausalLM, "CAUSAL_LM", stratify=data.dev_strata(job.task))
    tokenizer = prepared.loaded.tokenizer
    prompter = Prompter(job, tokenizer)
    features, truncated = {}, 0
    for split, exs in (("train", prepared.train), ("dev", prepared.dev)):
        features[split], cut = encode_all(tokenizer, [prompter.pair(ex) for ex in exs], prepared.max_length)
        truncated += cut
    masked = masked_example(tokenizer, features["train"][0])
    trainer, stats, packing = _train(job, prepared, features)
    final, merge_diff = common.final_model(
        job, trainer, prepared, features["dev"] + features["train"], padding_collator(tokenizer)
    )
    device = "cpu" if training.uses_cpu(job.model.device) else "cuda"
    lm = HFLM(final, tokenizer, prepared.loaded.identity, precision=pick_precision(job.model.dtype, device))
    rows, shares = training.across_processes(
        list(zip(job.test, [prompter.context(ex) for ex in job.test])),
        lambda share: mc_rows([ex for ex, _ in share], [ctx for _, ctx in share], lm),
        job.model.device,
    )
    info = {**_info(job, trainer, prepared, stats, final, merge_diff, shares, truncated, masked), **packing}
    info.update(model_folder=str(common.save(job, trainer, final, tokenizer)))
    return FinetuneResult(rows=rows, info=info)


class Prompter:
    """The prompt of an example: `finetune.template` (or a default) rendered, chat-wrapped if asked."""

    def __init__(self, job: FinetuneJob, tokenizer: Any):
        self.job, self.tokenizer = job, tokenizer
        where = f"{job.where}.template"
        source = job.config.template
        if source is None and job.task.type == "multiple_choice" and _has_question(job):
            source = MC_DEFAULT
        self.template = Template(source, where) if source is not None else None
        if job.config.chat and not getattr(tokenizer, "chat_template", None):
            raise TaskfitError(f"{job.where}.chat: model '{job.model.name}' has no chat template; set `chat: false`.")

    def render(self, example: Example) -> Rendered:
        if self.template is not None:
            return self.template.render(example)
        text = input_text(self.job.task, example)
        return Rendered(text + ("\nAnswer: " if self.job.task.type == "multiple_choice" else "\n"), "")

    def context(self, example: Example) -> Rendered:
        """`before` as the model reads it (chat-wrapped), and `after`."""
        rendered = self.render(example)
        if not self.job.config.chat:
            return rendered
        messages = [{"role": "user", "content": rendered.before.rstrip()}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return Rendered(text, rendered.after)

    def pair(self, example: Example) -> Pair:
        return self.pairs(example)[example.gold]

    def pairs(self, example: Example) -> list[Pair]:
        """One pair per option: for a generation example, per acceptable reference."""
        ctx = self.context(example)
        return [Pair(ctx.before, option + ctx.after) for option in example.options]


def _has_question(job: FinetuneJob) -> bool:
    examples = job.task.split("train") or job.test
    return bool(examples) and all("question" in ex.fields for ex in examples)


def input_text(task: Any, example: Example) -> str:
    """The fields of `task.input`, else every text field but the id, the label and the options, one a line."""
    cfg = task.config
    if cfg.input:
        return "\n".join("" if example.fields.get(f) is None else str(example.fields[f]) for f in cfg.input)
    choices = cfg.choices if isinstance(cfg.choices, list) else [cfg.choices]
    skip = {cfg.id, cfg.label, *choices}
    return "\n".join(v for k, v in example.fields.items() if k not in skip and isinstance(v, str))


def encode_all(tokenizer, pairs: list[Pair], max_length: int, eos: bool = False, joint: bool = True):
    """Features with labels -100 on the prompt (pairs encoded as `encode_pairs` does; `joint=False`
    encodes each answer on its own); over-long ones lose prompt tokens from the left (then answer
    tokens from the right). Returns the features and how many were cut."""
    features, cut = [], 0
    for ctx, cont in encode_pairs(tokenizer, [(p.prompt, p.answer) for p in pairs], joint):
        cont = cont + [tokenizer.eos_token_id] if eos else cont
        excess = len(ctx) + len(cont) - max_length
        if excess > 0:
            cut += 1
            ctx = ctx[min(excess, len(ctx) - 1) :]
            cont = cont[: max_length - len(ctx)]
        ids = ctx + cont
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(ctx) + cont})
    return features, cut


def masked_example(tokenizer: Any, feature: dict) -> str:
    """`[prompt]answer`: the bracketed part is masked (no loss), the rest is trained on; logged."""
    ids, labels = feature["input_ids"], feature["labels"]
    n = sum(1 for x in labels if x == -100)
    shown = f"[{tokenizer.decode(ids[:n])}]{tokenizer.decode(ids[n:])}"
    log.info("first training example, [masked prompt] then the trained tokens:\n%s", shown)
    return shown


def padding_collator(tokenizer: Any):
    """Pads each batch to its longest feature (labels with -100); features without labels
    (the merge check's probe) get none."""
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def collate(features: list[dict]) -> dict:
        return {k: v for k, v in pad(features).items() if v is not None}

    return collate


def packing_collator():
    """Packs a batch into one row: position ids restart at each feature, which transformers'
    attention turns into per-feature causal blocks; a feature's first label is -100, so no
    loss crosses a boundary."""
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def collate(features: list[dict]) -> dict:
        batch = flatten([{k: f[k] for k in ("input_ids", "labels") if k in f} for f in features])
        return {**batch, "use_cache": False}  # transformers reads packing from position ids only without a cache

    return collate


def packing_leaks(model: Any, tokenizer: Any, features: list[dict]) -> tuple[float, float]:
    """Largest |logit| difference between features scored alone and packed into one row (float
    rounding only, when packing keeps them apart; attention across boundaries shows up here),
    and the largest |logit| (the scale that rounding follows)."""
    probe = [{k: f[k] for k in ("input_ids", "labels")} for f in features[:PACKING_CHECK_INPUTS]]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = [
            model(input_ids=torch.tensor([f["input_ids"]], device=device), use_cache=False).logits[0] for f in probe
        ]
        batch = {k: v.to(device) for k, v in packing_collator()(probe).items() if k != "labels" and torch.is_tensor(v)}
        packed = model(**batch, use_cache=False).logits
    model.train(was_training)
    alone = torch.cat(alone)
    return float((alone - packed[0]).abs().max()), float(alone.abs().max())


def _train(
    job: FinetuneJob, prepared: common.Prepared, features: dict, metrics: Any = None
) -> tuple[Any, training.TrainStats, dict]:
    """Train; returns the Trainer, its stats, and the packing facts for the manifest.
    `metrics`: the dev metrics from the eval pass (default `answer_metrics`)."""
    tokenizer = prepared.loaded.tokenizer
    padded = padding_collator(tokenizer)
    collator, packing = padded, {"packing": False}
    if job.config.packing:
        leak, scale = packing_leaks(prepared.model, tokenizer, features["train"])
        apart = leak <= common.MERGE_TOLERANCE + common.MERGE_RELATIVE * scale  # the merge check's float32 rule
        packing = {"packing": apart, "packing_check_max_abs_diff": leak}
        if packing["packing"]:
            collator = packing_collator()
        else:
            log.warning(
                "%s.packing: '%s' lets packed examples see each other (logits moved by %.3g); training unpacked",
                job.where,
                job.model.name,
                leak,
            )
    trainer, stats = training.train(
        job,
        prepared.model,
        tokenizer,
        features["train"],
        features["dev"],
        metrics or answer_metrics,
        prepared.loaded.identity,
        metric=METRIC,
        collator=collator,
        preprocess_logits=greedy_hits,
        trainer_class=functools.partial(training.AnswerLossTrainer, eval_collator=padded),
    )
    return trainer, stats, packing


def greedy_hits(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1): 1 where the argmax at a position is the next label token (labels as given, unshifted)."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return (logits[:, :-1].argmax(-1) == labels[:, 1:]).float()


def answer_metrics(eval_pred: Any) -> dict[str, float]:
    """Token accuracy over the answer tokens, and the share of answers with every token right.

    An answer is a run of consecutive labelled positions (a packed row holds several, each
    after its own -100 prompt)."""
    right, total = _answer_counts(eval_pred)
    return {
        METRIC: float(right.sum() / max(total.sum(), 1)),
        "exact_match": float(np.mean(right == total)) if len(total) else 0.0,
    }


def best_reference_metrics(owners: list[int]):
    """`answer_metrics` where several answers belong to one example (`owners[k]`: the example
    of the k-th answer, in dev order): each example counts with its answer of highest token
    accuracy (the first of equals), and is an exact match when any of its answers is."""

    def metrics(eval_pred: Any) -> dict[str, float]:
        right, total = _answer_counts(eval_pred)
        if len(total) != len(owners):  # the eval pass must see every dev answer once, in order
            raise RuntimeError(f"dev metrics: {len(total)} answers in the eval pass, {len(owners)} expected")
        best: dict[int, int] = {}  # example -> its best answer
        exact: dict[int, bool] = {}
        for k, example in enumerate(owners):
            if example not in best or right[k] * total[best[example]] > right[best[example]] * total[k]:
                best[example] = k
            exact[example] = exact.get(example, False) or bool(right[k] == total[k])
        chosen = list(best.values())
        return {
            METRIC: float(right[chosen].sum() / max(total[chosen].sum(), 1)),
            "exact_match": float(np.mean(list(exact.values()))) if exact else 0.0,
        }

    return metrics


def _answer_counts(eval_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per answer, in order: its greedy-right tokens and its tokens."""
    hits = np.asarray(eval_pred.predictions)
    labels = np.asarray(eval_pred.label_ids)[:, 1:]
    width = min(hits.shape[1], labels.shape[1])  # both are padded to the longest batch (-100)
    hits, mask = hits[:, :width], labels[:, :width] != -100
    correct = (hits == 1) & mask
    runs = [(row, start, end) for row, m in enumerate(mask) for start, end in _runs(m)]
    right = np.array([int(correct[row, start:end].sum()) for row, start, end in runs], dtype=np.int64)
    total = np.array([end - start for _, start, end in runs], dtype=np.int64)
    return right, total


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _room_for_answers(job: FinetuneJob, train: list[dict], max_length: int) -> int:
    """New tokens test-time generation allows (the longest trained answer, EOS included, plus
    `MARGIN_TOKENS`), checked before training against `max_length`, which must also hold a prompt."""
    longest = max(sum(1 for x in f["labels"] if x != -100) for f in train)
    max_new = longest + MARGIN_TOKENS
    if max_new + MIN_PROMPT_TOKENS > max_length:
        raise TaskfitError(
            f"{job.where}.max_length: {max_length} tokens cannot hold a prompt and an answer at test time (the "
            f"longest trained answer takes {longest} tokens, and generation allows {MARGIN_TOKENS} more). Raise "
            f"max_length to at least {max_new + MIN_PROMPT_TOKENS}."
        )
    return max_new


def _generate(
    job, prompter: Prompter, model, tokenizer, max_length: int, max_new: int, multi_line: bool = False
) -> tuple[list[dict], list]:
    """Greedy predictions of the test split (shared by the processes of a multi-process launch),
    and how many examples each process predicted."""
    from taskfit.models.base import GenerationRequest
    from taskfit.models.generation import Generator

    model.eval()
    generator = Generator(model, tokenizer, max_length)

    def predict(examples: list[Example]) -> list[dict]:
        contexts = [prompter.context(ex) for ex in examples]
        requests = [
            # The trailing spaces of the prompt were trained as part of the answer (see `encode_pairs`).
            # Where the template's text after the answer starts a new line, a newline ends the
            # answer, unless training answers span lines themselves (`multi_line`): then only EOS,
            # which training put after every answer, ends it (a newline stop cut them short).
            GenerationRequest(
                ctx.before.rstrip(" "),
                max_new_tokens=max_new,
                stop=("\n",) if ctx.after.startswith("\n") and not multi_line else (),
                seed=job.seed,
            )
            for ctx in contexts
        ]
        with training.autocast(job.model):  # as trained and evaluated on dev
            texts = [samples[0] for samples in generator.generate(requests)]  # decoded together, each as if alone
        if generator.truncated:
            log.warning(
                "%s: %d test prompt(s) were cut from the left to leave %d tokens for the answer within max_length %d",
                job.where, generator.truncated, max_new, max_length,
            )  # fmt: skip
        return [
            {
                "id": ex.id,
                "label": ex.gold_text,
                "references": list(ex.options),
                "prediction": (answer := answer_of(text, ctx.after)),
                "correct": is_exact(answer, list(ex.options)),
                "generations": [text],
                "prompt": ctx.before,
            }
            for ex, ctx, text in zip(examples, contexts, texts)
        ]

    return training.across_processes(job.test, predict, job.model.device)


def answer_of(text: str, after: str) -> str:
    """The answer in a generated text: training taught answer + the template's text after the
    answer slot + EOS, so that text (where it is more than white space) ends the answer."""
    tail = after.strip()
    if tail and tail in text:
        text = text[: text.index(tail)]
    return text.strip()


def mc_rows(examples: list[Example], contexts: list[Rendered], lm: Any) -> list[dict]:
    """Rows like a prompted multiple-choice run's: each option scored as the prompt's continuation."""
    from taskfit.models.base import Request
    from taskfit.prompting.strategy import answer_fields, argmax, softmax

    requests = [[Request(c.before, o + c.after) for o in ex.options] for ex, c in zip(examples, contexts)]
    flat = [r for per in requests for r in per]
    scores = iter(lm.loglikelihood(flat))
    rows = []
    for ex, c, per in zip(examples, contexts, requests):
        raw = [next(scores) for _ in per]
        probs = softmax(raw)
        row = answer_fields(ex, argmax(probs), False)
        rows.append({**row, "scores": raw, "probabilities": probs, "prompt": c.before})
    return rows


def _info(job, trainer, prepared, stats, final, merge_diff, shares: list, truncated: int, masked: str) -> dict:
    info = common.info(job, trainer, prepared, stats, final, merge_diff, shares)
    info.update(truncated_inputs=truncated, masked_example=masked, dev_metric=f"{METRIC} (teacher-forced, answer only)")
    return info
