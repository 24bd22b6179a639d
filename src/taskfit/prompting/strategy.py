"""The scoring strategy: each option's answer strings are scored as continuations of the
rendered prompt; the best (optionally length-normalized) option is the prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from taskfit.config import PromptConfig
from taskfit.data import Example
from taskfit.errors import TaskfitError
from taskfit.models.base import Request
from taskfit.prompting.answers import answer_strings, combine
from taskfit.prompting.demos import select_demos
from taskfit.prompting.template import Rendered, Template
from taskfit.tasks import Task


@dataclass(frozen=True)
class Query:
    """What one test example asks of the model: the prompt and, per option, its requests."""

    example: Example
    prompt: str
    requests: list[list[Request]]  # [option][answer string]


class ScorePrompt:
    """A prompt run of the `score` kind, built once per run and applied per example."""

    def __init__(self, cfg: PromptConfig, task: Task, seed: int, where: str, chat=None):
        self.cfg = cfg
        self.where = where
        self.template = Template(cfg.template, f"{where}.template")
        self._chat = chat  # LM.chat, or None to check the prompt without a model
        if task.type == "classification":
            self.label_answers: list[list[str]] | None = answer_strings(task.labels, cfg.answers, where)
        else:
            if cfg.answers:
                raise TaskfitError(f"{where}.answers: multiple-choice options are their own answers; remove `answers`.")
            self.label_answers = None
        demos = select_demos(
            task.split("train"), cfg.shots, cfg.demos, seed, where, exclude=task.split("test"), id_field=task.config.id
        )
        self.demo_text = "".join(
            self.template.render(d).filled(self._strings(d)[d.gold][0]) + cfg.separator for d in demos
        )

    def _strings(self, example: Example) -> list[list[str]]:
        return self.label_answers if self.label_answers is not None else [[o] for o in example.options]

    def query(self, example: Example) -> Query:
        rendered: Rendered = self.template.render(example)
        context = self.demo_text + rendered.before
        if self.cfg.chat:
            # The whole prompt is the user's turn; the answer starts the assistant's reply.
            context = self._chat(context.rstrip()) if self._chat else context.rstrip()
        requests = [[Request(context, s + rendered.after) for s in strings] for strings in self._strings(example)]
        if any(r.continuation == "" for reqs in requests for r in reqs):
            raise TaskfitError(f"{example.source}: an answer option is empty, so there is nothing to score.")
        return Query(example, context, requests)

    def predict(self, query: Query, loglik: dict[Request, float]) -> dict[str, Any]:
        """The prediction row for one example, given the log-likelihood of each request."""
        raw, ranked = [], []
        for reqs in query.requests:
            lps = [loglik[r] for r in reqs]
            raw.append(combine(lps, self.cfg.combine))
            if self.cfg.normalize == "length":
                lps = [lp / len(r.continuation) for lp, r in zip(lps, reqs)]  # per character, as lm-eval's acc_norm
            ranked.append(combine(lps, self.cfg.combine))
        best = max(range(len(ranked)), key=lambda i: (ranked[i], -i))  # ties: the first option
        ex = query.example
        is_cls = self.label_answers is not None
        return {
            "id": ex.id,
            "label": ex.gold_text if is_cls else ex.gold,
            "prediction": ex.options[best] if is_cls else best,
            "correct": best == ex.gold,
            "scores": raw,
            **({"normalized_scores": ranked} if self.cfg.normalize != "none" else {}),
            "prompt": query.prompt,
        }
