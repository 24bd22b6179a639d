"""Scoring strategies: each option's answer strings are scored as continuations of the
rendered prompt. `ScorePrompt` is one template; `ScoreStrategy` combines templates
(mean probability, vote) and applies contextual calibration."""

from __future__ import annotations

import math
from collections import ChainMap
from dataclasses import dataclass, replace
from typing import Any

from taskfit.config import PromptConfig
from taskfit.data import Example
from taskfit.errors import TaskfitError
from taskfit.models.base import LM, Request, top_gap
from taskfit.prompting.answers import combine
from taskfit.prompting.builder import PromptBuilder
from taskfit.prompting.extract import majority_vote, vote_shares
from taskfit.tasks import Task


@dataclass(frozen=True)
class Query:
    """What one test example asks of the model: the prompt and, per option, its requests."""

    example: Example
    prompt: str
    requests: list[list[Request]]  # [option][answer string]


class ScorePrompt:
    """One template of a scored prompt run, built once per run and applied per example."""

    def __init__(self, cfg: PromptConfig, task: Task, seed: int, where: str, chat=None, template: str | None = None):
        self.cfg = cfg
        self.builder = PromptBuilder(cfg, task, seed, where, template or cfg.template_list[0], chat)
        self.is_classification = task.type == "classification"

    def query(self, example: Example, demos_of: Example | None = None, share_demos: bool = False) -> Query:
        """`example`'s query; `demos_of`, `share_demos`: see `PromptBuilder.context`."""
        ctx = self.builder.context(example, demos_of, share_demos)
        options = self.builder.options(example)
        requests = [[Request(ctx.text, s + ctx.rendered.after, ctx.shared) for s in strings] for strings in options]
        if any(r.continuation == "" for reqs in requests for r in reqs):
            raise TaskfitError(f"{example.source}: an answer option is empty, so there is nothing to score.")
        return Query(example, ctx.text, requests)

    def option_scores(self, query: Query, loglik: dict[Request, float]) -> tuple[list[float], list[float]]:
        """(raw, ranked): summed log-likelihood per option, and the same after `normalize`."""
        return option_scores(query.requests, loglik, self.cfg)

    def predict(self, query: Query, loglik: dict[Request, float]) -> dict[str, Any]:
        """The prediction row for one example, given the log-likelihood of each request."""
        raw, ranked = self.option_scores(query, loglik)
        return self.row(query, raw, ranked, softmax(ranked))

    def row(self, query: Query, raw: list[float], ranked: list[float], probs: list[float]) -> dict[str, Any]:
        best = argmax(probs)
        row = {**answer_fields(query.example, best, self.is_classification), "scores": raw}
        if self.cfg.normalize != "none":
            row["normalized_scores"] = ranked
        return {**row, "probabilities": probs, "prompt": query.prompt}


def option_scores(
    requests: list[list[Request]], loglik: dict[Request, float], cfg: PromptConfig
) -> tuple[list[float], list[float]]:
    """(raw, ranked) per option of `requests` ([option][answer string]): its answer strings'
    log-likelihoods pooled as `answer_pooling` says, and the same after `normalize`."""
    raw, ranked = [], []
    for reqs in requests:
        lps = [loglik[r] for r in reqs]
        raw.append(combine(lps, cfg.answer_pooling))
        if cfg.normalize == "length":
            lps = [lp / len(r.continuation) for lp, r in zip(lps, reqs)]  # per character, as lm-eval's acc_norm
        ranked.append(combine(lps, cfg.answer_pooling))
    return raw, ranked


class ScoreStrategy:
    """Scores with one or several templates; combines them and calibrates when asked."""

    def __init__(self, cfg: PromptConfig, task: Task, seed: int, where: str, templates: list[str], chat=None):
        self.cfg, self.task = cfg, task
        self.prompts = [ScorePrompt(cfg, task, seed, where, chat, template=t) for t in templates]
        self.calibrate = cfg.calibrate == "contextual"
        if self.calibrate and task.type == "generation":
            raise TaskfitError(f"{where}.calibrate: contextual calibration needs options to score; remove it here.")

    def check(self, examples: list[Example]) -> None:
        for prompt in self.prompts:
            for ex in examples:
                prompt.query(ex)

    def predict(self, examples: list[Example], lm: LM) -> list[dict[str, Any]]:
        # Contextual calibration asks what *this* prompt gives a content-free input: with
        # demonstrations per example, its content-free inputs show the example's own (not those
        # nearest to "N/A"), and its queries declare them as their shared start: they are then
        # computed once per example instead of once per query.
        share = self.calibrate and self.prompts[0].builder.per_example_demos
        queries = [[p.query(ex, share_demos=share) for ex in examples] for p in self.prompts]  # [template][example]
        free = [[[p.query(cf, ex, share) for cf in self._content_free(ex)] for ex in examples] for p in self.prompts]
        wanted = [r for qs in queries for q in qs for reqs in q.requests for r in reqs]
        if self.calibrate:
            wanted += [r for per_t in free for per_ex in per_t for q in per_ex for reqs in q.requests for r in reqs]
        wanted = list(dict.fromkeys(wanted))
        loglik = dict(zip(wanted, lm.loglikelihood(wanted)))
        rows = [
            [self._template_row(t, queries[t][i], free[t][i], loglik) for t in range(len(self.prompts))]
            for i in range(len(examples))
        ]
        self._recheck(rows, queries, free, loglik, lm)
        return [self._combined(ex, per_template) for ex, per_template in zip(examples, rows)]

    def _recheck(self, rows, queries, free, loglik, lm) -> None:
        """Under bf16 (a backend naming its `recheck_margin`), score again in float32 each template
        row whose two best options are within the margin once answer strings are pooled, scores
        normalized and calibrated: the backend rechecks only where two answer strings are that
        close, which misses near-ties that pooling, normalization or calibration make. A row is
        recomputed from its own queries' float32 scores alone (the content-free queries other
        examples share keep their bf16 scores there), so it depends on no other example. With
        `combine: mean_prob`, a near-tie of the templates' average rechecks all of its rows."""
        margin = recheck_margin(lm)
        if not margin:
            return
        close = [
            (i, t)
            for i, per in enumerate(rows)
            for t, row in enumerate(per)
            if probability_gap(row["probabilities"]) < margin or self._mean_gap(per) < margin
        ]
        needs = {
            (i, t): [r for q in [queries[t][i], *free[t][i]] for r in not_rechecked(q.requests, loglik, margin)]
            for i, t in close
        }
        for (i, t), own in with_exact(lm, needs, loglik).items():
            rows[i][t] = self._template_row(t, queries[t][i], free[t][i], own)

    def _mean_gap(self, per_template: list[dict[str, Any]]) -> float:
        """The gap `combine: mean_prob` predicts from (the templates' averaged probabilities): a
        near-tie there rechecks every template of the example, though none alone is that close."""
        if self.cfg.combine != "mean_prob" or len(per_template) < 2:
            return math.inf
        n = len(per_template[0]["probabilities"])
        return probability_gap([sum(r["probabilities"][k] for r in per_template) / len(per_template) for k in range(n)])

    def _template_row(self, t: int, query: Query, free: list[Query], loglik) -> dict[str, Any]:
        prompt = self.prompts[t]
        raw, ranked = prompt.option_scores(query, loglik)
        probs = softmax(ranked)
        if self.calibrate:
            probs, p_cf = calibrated(ranked, [prompt.option_scores(q, loglik)[1] for q in free])
        row = prompt.row(query, raw, ranked, probs)
        if self.calibrate:
            row["content_free_probabilities"] = p_cf
        return row

    def _combined(self, ex: Example, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if len(rows) == 1:
            return rows[0]
        n = len(rows[0]["probabilities"])
        if self.cfg.combine == "vote":
            choices = [argmax(r["probabilities"]) for r in rows]
            best, _ = majority_vote(choices)
            probs = vote_shares(choices, n)
        else:  # mean_prob
            probs = [sum(r["probabilities"][k] for r in rows) / len(rows) for k in range(n)]
            best = argmax(probs)
        fields = answer_fields(ex, best, self.task.type == "classification")
        return {
            **fields,
            "scores": rows[0]["scores"],
            "template_scores": [r["scores"] for r in rows],
            "template_predictions": [r["prediction"] for r in rows],
            "probabilities": probs,
            "prompt": rows[0]["prompt"],
        }

    def _content_free(self, ex: Example) -> list[Example]:
        """The example with every text field (but the options) replaced by each content-free string."""
        if not self.calibrate:
            return []
        cfg = self.task.config
        keep = {cfg.id, cfg.label} | set([cfg.choices] if isinstance(cfg.choices, str) else cfg.choices or [])
        out = []
        for text in self.cfg.content_free:
            fields = {k: (text if isinstance(v, str) and k not in keep else v) for k, v in ex.fields.items()}
            out.append(replace(ex, id=f"{ex.id}#content-free", fields=fields))
        return out


def answer_fields(ex: Example, best: int, is_classification: bool) -> dict[str, Any]:
    return {
        "id": ex.id,
        "label": ex.gold_text if is_classification else ex.gold,
        "prediction": ex.options[best] if is_classification else best,
        "correct": best == ex.gold,
    }


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first option


def probability_gap(probs: list[float]) -> float:
    """Log-probability gap between the two most probable options (inf with fewer than two possible)."""
    return top_gap(math.log(p) for p in probs if p > 0)


def recheck_margin(lm: LM) -> float:
    """The margin within which a backend computing in bf16 has near-ties rechecked in float32 (0: none)."""
    return getattr(lm, "identity", {}).get("recheck_margin", 0)


def not_rechecked(requests: list[list[Request]], loglik: dict[Request, float], margin: float) -> list[Request]:
    """One context's requests (per option, its answer strings), unless the backend rechecked them
    in float32 already, which it does where two of their scores are within `margin`."""
    flat = [r for reqs in requests for r in reqs]
    return flat if top_gap(loglik[r] for r in flat) >= margin else []


def with_exact(lm: LM, needs: dict, loglik: dict[Request, float]) -> dict:
    """Per key of `needs` with requests, `loglik` with those requests' float32 scores in place of
    their bf16 ones (one `loglikelihood_exact` call for all keys; each key sees only its own, so
    requests that other keys share keep their bf16 scores there)."""
    wanted = list(dict.fromkeys(r for reqs in needs.values() for r in reqs))
    if not wanted:
        return {}
    exact = dict(zip(wanted, lm.loglikelihood_exact(wanted)))
    return {key: ChainMap({r: exact[r] for r in reqs}, loglik) for key, reqs in needs.items() if reqs}


def calibrated(ranked: list[float], free: list[list[float]]) -> tuple[list[float], list[float]]:
    """Contextual calibration (Zhao et al. 2021): each option's probability divided by its mean
    probability over the content-free inputs (`free`: their ranked scores), renormalized; and
    those mean probabilities. Divided in log space: a multi-token option's content-free
    probability is often far below any floor one could put under a division (1e-50 here)."""
    log_cf = [combine(col, "logsumexp") - math.log(len(col)) for col in zip(*(log_softmax(scores) for scores in free))]
    probs = softmax([lp - cf for lp, cf in zip(log_softmax(ranked), log_cf)])
    return probs, [math.exp(cf) for cf in log_cf]


def log_softmax(scores: list[float]) -> list[float]:
    total = combine(scores, "logsumexp")
    return [s - total for s in scores]


def softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    return normalized(exps)


def normalized(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values]
