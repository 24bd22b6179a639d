"""The prompting baseline for token classification: the model writes a sentence's entities,
one per line as `entity text: TYPE`, and the lines are matched back to the tokens.

- Templates see `{{ text }}`, the tokens joined by spaces (see `tasks.token_classification`).
- Demonstrations fill the answer slot with their gold entities in sentence order, one line
  each (an entity that occurs twice is listed twice), or with `none` when there is none.
- Generation uses the prompt's decoding settings (greedy by default) and stops at the
  separator, since the answer itself spans lines, and at a new line that starts like the
  template's first line (`\\nSentence:`), where a model would begin an example of its own.
  `stop` replaces both.
- Parsing, line by line: list bullets (`- `, `* `, `1. `) are dropped; a line `none` or an
  empty line names no entity; otherwise the line is split at its last colon into span and
  type. The type is matched to the task's entity types ignoring case and surrounding
  punctuation. The span, its surrounding punctuation removed (`Paris.` is `Paris`), is
  matched, the longest spans first, to the first run of not yet used tokens whose text equals
  it ignoring case, Unicode form (NFKC) and whitespace, so `John's` finds the tokens `John 's`
  (and `Paris Hilton` takes its tokens before `Paris` looks for its own); failing that,
  the span as written (so `U.S.` finds the token `U.S.`). Lines without a colon, with an
  unknown type or with a span not found are ignored, listed in the row's `unparsed`, and
  counted: `parse_failed` is the fraction of the row's entity lines that were ignored (0.0
  without any), and the metric of that name its mean over rows.
- The matched entities become tags in the task's scheme (BIO, IO, IOBES or plain).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

from taskfit.config import PromptConfig
from taskfit.data import Example
from taskfit.errors import TaskfitError
from taskfit.models.base import LM
from taskfit.prompting.builder import Context, PromptBuilder, generation_request
from taskfit.prompting.extract import canonical
from taskfit.tasks import Task
from taskfit.tasks.token_classification import Span, encode, entity_types, spans, task_scheme

NONE = "none"
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def build_entity_strategy(cfg: PromptConfig, task: Task, seed: int, where: str, templates: list[str], chat=None):
    if len(templates) > 1 and cfg.combine in ("mean_prob", "vote"):
        raise TaskfitError(
            f"{where}.combine: `{cfg.combine}` ensembles scored templates; token classification prompts generate "
            "their answer: use `combine: each` or `select_on_dev`."
        )
    return EntityStrategy(cfg, task, seed, where, templates[0], chat)


# --------------------------------------------------------------------------- pure functions


def entity_lines(tokens: list[str], tags: list[str]) -> str:
    """The answer a demonstration shows: `entity text: TYPE` per entity, or `none`."""
    lines = [f"{' '.join(tokens[start : end + 1])}: {kind}" for kind, start, end in spans(tags)]
    return "\n".join(lines) or NONE


@dataclass
class Parsed:
    spans: list[Span] = field(default_factory=list)
    lines: int = 0
    """Entity lines seen (not counting empty and `none` lines)."""
    unparsed: list[str] = field(default_factory=list)

    @property
    def failed(self) -> float:
        return len(self.unparsed) / self.lines if self.lines else 0.0


def parse_entities(text: str, tokens: list[str], types: list[str]) -> Parsed:
    """Match each `span: TYPE` line of `text` to the first unused occurrence in `tokens`, the
    longest spans first: `Paris Hilton` takes its tokens before `Paris` looks for its own,
    whatever order the lines come in."""
    by_name = {canonical(t): t for t in types}
    token_keys = [_key(t) for t in tokens]
    used = [False] * len(tokens)
    out = Parsed()
    entries = []  # (line index, raw line, span text, type)
    for raw in re.split(r"\r?\n", text):  # newlines only: str.splitlines also splits at \x0b, \x1c, U+2028
        line = _BULLET.sub("", unicodedata.normalize("NFKC", raw)).strip()
        if not line or canonical(line) == NONE:
            continue
        out.lines += 1
        span_text, colon, type_text = line.rpartition(":")
        entries.append((len(entries), raw, span_text, by_name.get(canonical(type_text)) if colon else None))
    failed = set()
    for i, _raw, span_text, kind in sorted(entries, key=lambda e: -len(_key(canonical(e[2])))):
        found = _find(span_text, token_keys, used) if kind else None
        if found is None:
            failed.add(i)
            continue
        start, end = found
        used[start : end + 1] = [True] * (end - start + 1)
        out.spans.append((kind, start, end))
    out.unparsed = [raw for i, raw, _, _ in entries if i in failed]  # in the order written
    out.spans.sort(key=lambda s: s[1])
    return out


def _key(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def _find(span_text: str, token_keys: list[str], used: list[bool]) -> tuple[int, int] | None:
    for wanted in dict.fromkeys((_key(canonical(span_text)), _key(span_text))):
        if wanted:
            found = _first_run(wanted, token_keys, used)
            if found is not None:
                return found
    return None


def _first_run(wanted: str, token_keys: list[str], used: list[bool]) -> tuple[int, int] | None:
    """(start, end) of the first run of unused tokens whose keys concatenate to `wanted`."""
    for start in range(len(token_keys)):
        joined = ""
        for end in range(start, len(token_keys)):
            if used[end]:
                break
            joined += token_keys[end]
            if joined == wanted:
                return start, end
            if not wanted.startswith(joined):
                break
    return None


# --------------------------------------------------------------------------- the strategy


class EntityStrategy:
    def __init__(self, cfg: PromptConfig, task: Task, seed: int, where: str, template: str, chat=None):
        _check_supported(cfg, where)
        self.cfg, self.task, self.where, self.seed = cfg, task, where, seed
        self.builder = PromptBuilder(cfg, task, seed, where, template, chat)
        self.types = entity_types(task.tags or ())
        self.scheme = task_scheme(task)
        self.stop = tuple(cfg.stop) if cfg.stop is not None else self._default_stop(template)

    def _default_stop(self, template: str) -> tuple[str, ...]:
        if self.cfg.separator == "\n":
            raise TaskfitError(
                f"{self.where}.separator: entity answers span several lines, so a separator of one newline cannot "
                'end an answer. Use a blank line (the default "\\n\\n"), or set `stop`.'
            )
        stops = [self.cfg.separator or "\n\n"]
        head = template.lstrip().split("\n", 1)[0].split("{", 1)[0].strip()  # "Sentence:"
        if head:
            stops.append("\n" + head)
        return tuple(stops)

    def check(self, examples: list[Example]) -> None:
        for ex in examples:
            self.context(ex)

    def answer(self, example: Example) -> str:
        cfg = self.task.config
        return entity_lines(example.fields[cfg.tokens], example.fields[cfg.label])

    def _view(self, example: Example) -> Example:
        """What templates see: a tokens field named `text` renders as the sentence, not a list."""
        tokens = self.task.config.tokens
        if tokens != "text":
            return example
        return replace(example, fields={**example.fields, "text": " ".join(example.fields[tokens])})

    def context(self, example: Example) -> Context:
        template = self.builder.template
        demos = "".join(
            template.render(self._view(d)).filled(self.answer(d)) + self.cfg.separator
            for d in self.builder.demos(example)
        )
        return self.builder.assemble(demos, template.render(self._view(example)))

    def predict(self, examples: list[Example], lm: LM) -> list[dict[str, Any]]:
        contexts = [self.context(ex) for ex in examples]
        outputs = lm.generate([generation_request(ctx, self.cfg, self.stop, self.seed, 1) for ctx in contexts])
        return [self._row(ex, ctx, texts[0]) for ex, ctx, texts in zip(examples, contexts, outputs)]

    def _row(self, ex: Example, ctx: Context, text: str) -> dict[str, Any]:
        cfg = self.task.config
        tokens, gold = ex.fields[cfg.tokens], ex.fields[cfg.label]
        parsed = parse_entities(text, tokens, self.types)
        prediction = encode(parsed.spans, len(tokens), self.scheme)
        return {
            "id": ex.id,
            "tokens": tokens,
            "label": gold,
            "prediction": prediction,
            "correct": prediction == gold,
            "generations": [text],
            "parse_failed": parsed.failed,
            "unparsed": parsed.unparsed,
            "prompt": ctx.text,
        }


def _check_supported(cfg: PromptConfig, where: str) -> None:
    unsupported = {
        "chain_of_thought": cfg.chain_of_thought,
        "samples": cfg.samples > 1,
        "extract": cfg.extract is not None,
        "answers": cfg.answers is not None,
        "calibrate": cfg.calibrate != "none",
    }
    for key, present in unsupported.items():
        if present:
            raise TaskfitError(
                f"{where}.{key}: not available for token_classification prompts, where the model writes the "
                "entities as lines `entity text: TYPE`. Remove it."
            )
