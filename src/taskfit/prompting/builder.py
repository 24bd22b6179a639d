"""Turning one example into prompt text: demonstrations, template, chat wrapping and the
chain-of-thought trigger. Shared by the scoring and the generating strategies."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from taskfit.config import PromptConfig
from taskfit.data import Example
from taskfit.errors import TaskfitError
from taskfit.models.base import GenerationRequest
from taskfit.prompting.answers import answer_strings
from taskfit.prompting.demos import select_demos
from taskfit.prompting.template import Rendered, Template, render_plain
from taskfit.tasks import Task


@functools.cache
def _embedder():
    """One MiniLM embedder per process: every cell of an experiment shares its model and text cache."""
    from taskfit.prompting.similar import MiniLMEmbedder

    return MiniLMEmbedder()


@dataclass(frozen=True)
class Context:
    text: str
    """Everything the model reads before the answer: demos, the example, chat wrapping."""
    rendered: Rendered
    shared: int = 0
    """How many leading characters of `text` every example of the run has: the chat header, and
    the demonstrations and the template's literal start when the demonstrations are fixed (see
    `shared_start`); with `share_demos`, those every query of one example has."""


def shared_start(text: str, body: str, demos: str, lead: str, fixed: bool) -> int:
    """The length of `text`'s start that every example of the run has: whatever chat header
    precedes `body` (the prompt's own text, which starts with `demos`), then, where the
    demonstrations are fixed, the demonstrations and the template's literal `lead`
    ("Question: ") but its trailing spaces (a space token merges with the word after it, so
    queries that go on alike would otherwise not tokenize their start alike: "Review: N/A" and
    "Review: " + newline); 0 where the body cannot be found in `text`."""
    at = text.find(body) if body else -1
    if at < 0 or not fixed:
        return max(at, 0)
    end = at + len(demos)
    return end + len(lead.rstrip(" ")) if text.startswith(lead, end) else end


def generation_request(
    ctx: Context, cfg: PromptConfig, stop: tuple[str, ...], seed: int, samples: int
) -> GenerationRequest:
    """The request that continues `ctx` with the run's decoding settings (its shared start runs once)."""
    return GenerationRequest(
        generation_prompt(ctx),
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_p,
        cfg.top_k,
        stop,
        samples,
        seed,
        ctx.shared,
    )


def generation_prompt(ctx: Context) -> str:
    """What the model continues: the prompt without the spaces that end it. A template's space
    before `{{ answer }}` belongs to the answer, as in scoring (see `encode_pairs`) and in
    fine-tuning: a prompt ending in a lone space token makes a model continue from a place it
    rarely saw (the default model named 0 of 16 capitals after "Capital: ", 10 after "Capital:").
    The generated text then starts with that space; answers are stripped."""
    return ctx.text.rstrip(" ")


class PromptBuilder:
    def __init__(self, cfg: PromptConfig, task: Task, seed: int, where: str, template: str, chat=None):
        self.cfg, self.task, self.seed, self.where = cfg, task, seed, where
        self.template = Template(template, f"{where}.template" + ("s" if cfg.templates else ""))
        self._chat = chat  # LM.chat, or None to check the prompt without a model
        self.label_answers = self._label_answers()
        self._similar = None
        if cfg.demos == "similar" and cfg.shots:
            self._fixed: list[Example] | None = None
        else:
            train = task.split("train")
            test, memo = task.split("test"), task.memo
            demos = select_demos(train, cfg.shots, cfg.demos, seed, where, test, task.config.id, memo)
            self._fixed = self._ordered(demos, str(seed))

    def _label_answers(self) -> list[list[str]] | None:
        if self.task.type == "classification":
            return answer_strings(self.task.labels, self.cfg.answers, self.where)
        if self.cfg.answers:
            kind = "multiple-choice options" if self.task.type == "multiple_choice" else "generation targets"
            raise TaskfitError(f"{self.where}.answers: {kind} are their own answers; remove `answers`.")
        return None

    def options(self, example: Example) -> list[list[str]]:
        """Answer strings per option: the verbalizer's (classification) or the options themselves."""
        return self.label_answers if self.label_answers is not None else [[o] for o in example.options]

    def demos(self, example: Example) -> list[Example]:
        if self._fixed is not None:
            return self._fixed
        if self._similar is None:
            from taskfit.prompting.similar import SimilarDemos

            self._similar = SimilarDemos(self.task.split("train"), self._text_of, embedder=_embedder())
        return self._ordered(self._similar.select(example, self.cfg.shots), f"{self.seed}-{example.id}")

    def _text_of(self, example: Example) -> str:
        skip = {self.task.config.id, self.task.config.label, self.cfg.rationale}
        return "\n".join(str(v) for k, v in example.fields.items() if k not in skip and isinstance(v, str))

    def _ordered(self, demos: list[Example], key: str) -> list[Example]:
        if self.cfg.order == "random":
            demos = list(demos)
            random.Random(key).shuffle(demos)
        return demos

    def demo_text(self, example: Example) -> str:
        parts = []
        for demo in self.demos(example):
            answer = self.options(demo)[demo.gold][0]
            if self.cfg.chain_of_thought:
                answer = self._with_rationale(demo, answer)
            parts.append(self.template.render(demo).filled(answer) + self.cfg.separator)
        return "".join(parts)

    def _with_rationale(self, demo: Example, answer: str) -> str:
        if self.cfg.rationale not in demo.fields:
            raise TaskfitError(
                f"{demo.source}: chain-of-thought demonstrations need the field '{self.cfg.rationale}' (`rationale`) "
                "with the reasoning. Add it to the train split, or set `rationale` to the field that has it."
            )
        variables = {**demo.fields, "rationale": demo.fields[self.cfg.rationale], "answer": answer}
        return render_plain(self.cfg.answer_format, variables, f"{self.where}.answer_format")

    @property
    def per_example_demos(self) -> bool:
        """Whether each example has demonstrations of its own (`demos: similar`)."""
        return self._fixed is None

    def context(self, example: Example, demos_of: Example | None = None, share_demos: bool = False) -> Context:
        """`example`'s prompt, showing the demonstrations of `demos_of` (default: its own; a
        content-free input of contextual calibration shows its example's). `share_demos`: the
        demonstrations belong to the declared shared start even where they are one example's
        own (the queries of one example that calibration makes all start with them)."""
        rendered = self.template.render(example)
        # zero-shot chain of thought (Kojima et al. 2022): the trigger follows the example
        tail = self.cfg.trigger if self.cfg.chain_of_thought and not self.cfg.shots else ""
        return self.assemble(self.demo_text(demos_of or example), rendered, tail, share_demos)

    def assemble(self, demos: str, rendered: Rendered, tail: str = "", share_demos: bool = False) -> Context:
        """The context of rendered demonstrations and an example's rendered template (then
        `tail`), wrapped as the user's turn under `chat`, with its shared start."""
        body = demos + rendered.before + tail
        text = body
        if self.cfg.chat:
            # The whole prompt is the user's turn; the answer starts the assistant's reply.
            body = body.rstrip()
            text = self._chat(body) if self._chat else body
        fixed = share_demos or not self.per_example_demos
        return Context(text, rendered, shared_start(text, body, demos, self.template.lead, fixed))

    @property
    def reasoning_to_answer(self) -> str:
        """What joins generated reasoning to the answer, from `answer_format` (" So the answer is ")."""
        fmt = self.cfg.answer_format
        if "{{ rationale }}" in fmt and "{{ answer }}" in fmt:
            return fmt.split("{{ rationale }}", 1)[1].split("{{ answer }}", 1)[0]
        return " "
