"""Generating strategies: chain-of-thought, repeated sampling with voting, and free-text
answers for generation tasks.

Self-consistency is `samples → extract → vote` (Wang et al. 2022). When extraction fails
for a sample, the options are scored as the continuation of that sample's reasoning
(joined by the text `answer_format` puts between rationale and answer, " So the answer
is " by default) — the fallback — and the failure is counted in `extraction_failed`, a
metric of its own, so it is never silently right or wrong. On a generation task the
extracted text is the answer, and a sample the pattern does not match answers with its whole
text (stripped), also counted in `extraction_failed`.
"""

from __future__ import annotations

import re
from typing import Any

from taskfit.config import PromptConfig
from taskfit.data import Example
from taskfit.evaluation.text_metrics import is_exact
from taskfit.models.base import LM, GenerationRequest, Request
from taskfit.prompting.builder import Context, PromptBuilder, generation_prompt, generation_request
from taskfit.prompting.extract import extract, majority_text, majority_vote, match_option, vote_shares
from taskfit.prompting.strategy import (
    answer_fields,
    argmax,
    not_rechecked,
    option_scores,
    probability_gap,
    recheck_margin,
    softmax,
    with_exact,
)
from taskfit.tasks import Task


class GenerateStrategy:
    def __init__(self, cfg: PromptConfig, task: Task, seed: int, where: str, template: str, chat=None):
        self.cfg, self.task, self.seed = cfg, task, seed
        self.builder = PromptBuilder(cfg, task, seed, where, template, chat)
        self.pattern = re.compile(cfg.extract) if cfg.extract else None
        self.stop = tuple(cfg.stop) if cfg.stop is not None else _default_stop(cfg)

    def check(self, examples: list[Example]) -> None:
        for ex in examples:
            self.builder.context(ex)

    def request(self, ctx: Context) -> GenerationRequest:
        return generation_request(ctx, self.cfg, self.stop, self.seed, self.cfg.samples)

    def predict(self, examples: list[Example], lm: LM) -> list[dict[str, Any]]:
        contexts = [self.builder.context(ex) for ex in examples]
        outputs = lm.generate([self.request(ctx) for ctx in contexts])
        if self.task.type == "generation":
            return [self._text_row(ex, ctx, texts) for ex, ctx, texts in zip(examples, contexts, outputs)]
        return self._choice_rows(examples, contexts, outputs, lm)

    def _text_row(self, ex: Example, ctx: Context, texts: list[str]) -> dict[str, Any]:
        answers = [extract(t, self.pattern) for t in texts]
        failed = [a is None for a in answers]
        answers = [t.strip() if a is None else a.strip() for a, t in zip(answers, texts)]
        prediction, agreement = majority_text(answers)
        row = {"id": ex.id, "label": ex.gold_text, "references": list(ex.options), "prediction": prediction}
        row["correct"] = is_exact(prediction, row["references"])
        row["generations"] = texts
        if self.pattern is not None:
            row["extraction_failed"] = sum(failed) / len(failed)
        if len(texts) > 1:
            row["vote_agreement"] = agreement
        return {**row, "prompt": ctx.text}

    def _choice_rows(self, examples, contexts, outputs, lm: LM) -> list[dict[str, Any]]:
        extracted = [[extract(t, self.pattern) for t in texts] for texts in outputs]
        picks = [[match_option(e, self.builder.options(ex)) for e in per] for ex, per in zip(examples, extracted)]
        fallback = self._fallback_requests(examples, contexts, outputs, picks)
        wanted = list(dict.fromkeys(r for reqs in fallback.values() for per_option in reqs for r in per_option))
        loglik = dict(zip(wanted, lm.loglikelihood(wanted))) if wanted else {}
        probs = {key: _option_probs(reqs, loglik, self.cfg) for key, reqs in fallback.items()}
        if self.cfg.vote == "mean_prob":
            _recheck_means(fallback, probs, loglik, lm, self.cfg)
        rows = []
        for i, (ex, ctx, texts) in enumerate(zip(examples, contexts, outputs)):
            probs_per_sample = {s: probs[i, s] for s in range(len(texts)) if (i, s) in probs}
            row = self._choice_row(ex, ctx, texts, picks[i], probs_per_sample)
            rows.append({**row, "extracted": extracted[i]})
        return rows

    def _fallback_requests(self, examples, contexts, outputs, picks) -> dict[tuple[int, int], list[list[Request]]]:
        """Option requests after each sample's reasoning: for failed samples, or all (vote: mean_prob)."""
        joiner = self.builder.reasoning_to_answer if self.cfg.chain_of_thought else ""
        out = {}
        for i, (ex, ctx, texts) in enumerate(zip(examples, contexts, outputs)):
            start = None
            for s, text in enumerate(texts):
                if picks[i][s] is None or self.cfg.vote == "mean_prob":
                    start = self._fallback_start(ex, ctx) if start is None else start
                    head = generation_prompt(ctx) + text.rstrip() + joiner
                    out[i, s] = [
                        [Request(head, a + ctx.rendered.after, start) for a in strings]
                        for strings in self.builder.options(ex)
                    ]
        return out

    def _fallback_start(self, ex: Example, ctx: Context) -> int:
        """The start that one example's fallback requests declare shared: the run's, or where the
        demonstrations are the example's own (`demos: similar`), those and the template's lead,
        which every sample's requests begin with (computed once for the example's samples)."""
        return self.builder.context(ex, share_demos=True).shared if self.builder.per_example_demos else ctx.shared

    def _choice_row(self, ex, ctx, texts, picks, probs_per_sample) -> dict[str, Any]:
        resolved = [p if p is not None else argmax(probs_per_sample[s]) for s, p in enumerate(picks)]
        n = len(self.builder.options(ex))
        if self.cfg.vote == "mean_prob":
            probs = [sum(probs_per_sample[s][k] for s in range(len(texts))) / len(texts) for k in range(n)]
            best = argmax(probs)
            agreement = sum(r == best for r in resolved) / len(resolved)
        else:
            best, agreement = majority_vote(resolved)
            probs = vote_shares(resolved, n)
        row = answer_fields(ex, best, self.task.type == "classification")
        row.update(generations=texts, extraction_failed=sum(p is None for p in picks) / len(picks))
        if len(texts) > 1:
            row["vote_agreement"] = agreement
        return {**row, "probabilities": probs, "prompt": ctx.text}


def _option_probs(requests: list[list[Request]], loglik, cfg: PromptConfig) -> list[float]:
    """Option probabilities after one sample's reasoning: its answer strings pooled and normalized
    as in a scored run (`answer_pooling`, `normalize`)."""
    return softmax(option_scores(requests, loglik, cfg)[1])


def _recheck_means(fallback: dict, probs: dict, loglik: dict, lm: LM, cfg: PromptConfig) -> None:
    """Under bf16 (a backend naming its `recheck_margin`), `vote: mean_prob` can bring an
    example's two best options within the margin once its samples' probabilities are averaged,
    where no sample's answer strings were that close (those the backend rechecked): that
    example's option scores are computed again in float32, from its own requests alone, and its
    samples' probabilities replaced in `probs`. The generated reasoning itself is not rechecked."""
    margin = recheck_margin(lm)
    if not margin:
        return
    samples: dict[int, list[int]] = {}
    for i, s in fallback:
        samples.setdefault(i, []).append(s)
    means = {i: [sum(col) / len(ss) for col in zip(*(probs[i, s] for s in ss))] for i, ss in samples.items()}
    close = [i for i, mean in means.items() if probability_gap(mean) < margin]
    needs = {i: [r for s in samples[i] for r in not_rechecked(fallback[i, s], loglik, margin)] for i in close}
    for i, own in with_exact(lm, needs, loglik).items():
        for s in samples[i]:
            probs[i, s] = _option_probs(fallback[i, s], own, cfg)


def _default_stop(cfg: PromptConfig) -> tuple[str, ...]:
    """Reasoning spans lines, so chain of thought stops where a demonstration would end;
    a direct answer stops at the end of its line."""
    return (cfg.separator or "\n\n",) if cfg.chain_of_thought else ("\n",)
