"""Jinja2 templates with one `{{ answer }}` slot.

The template is rendered in a sandbox with undefined variables as errors. The slot is
found by rendering with a sentinel in its place: the text before it is the context; the
answer plus the text after it (a cloze prompt) is the continuation that gets scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from taskfit.data import Example
from taskfit.errors import TaskfitError

_SLOT = "\x00taskfit-answer\x00"
_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@dataclass(frozen=True)
class Rendered:
    before: str
    """Everything before the answer slot: the context."""
    after: str
    """Everything after the slot; non-empty for a cloze prompt."""

    def filled(self, answer: str) -> str:
        return self.before + answer + self.after


class Template:
    def __init__(self, source: str, where: str):
        self.source = source
        self.where = where
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TaskfitError(f"{where}: template syntax error on its line {exc.lineno}: {exc.message}.") from None
        self.lead = _lead(_ENV.parse(source))
        """The literal text every rendering starts with, before the first variable or tag
        ("Question: "); empty where the template starts with one."""

    def render(self, example: Example) -> Rendered:
        variables: dict[str, Any] = dict(example.fields)
        variables["example"] = example.fields  # fields shadowed by `answer` stay reachable
        variables["answer"] = _SLOT
        try:
            text = self._template.render(variables)
        except jinja2.UndefinedError as exc:
            fields = ", ".join(map(str, example.fields))
            raise TaskfitError(
                f"{self.where}: the template uses a variable that example {example.id} ({example.source}) "
                "does not have "
                f"({exc.message}). Fields available: {fields}."
            ) from None
        except jinja2.TemplateError as exc:
            raise TaskfitError(f"{self.where}: rendering failed for example {example.id}: {exc}.") from None
        parts = text.split(_SLOT)
        if len(parts) != 2:
            raise TaskfitError(
                f"{self.where}: the template must contain the answer slot `{{{{ answer }}}}` exactly once "
                f"(found it {len(parts) - 1} times)."
            )
        return Rendered(parts[0], parts[1])


def _lead(tree: nodes.Template) -> str:
    first = tree.body[0] if tree.body else None
    if isinstance(first, nodes.Output) and first.nodes and isinstance(first.nodes[0], nodes.TemplateData):
        return first.nodes[0].data
    return ""


def render_plain(source: str, variables: dict[str, Any], where: str) -> str:
    """Render a template that has no answer slot (such as `answer_format`)."""
    try:
        return _ENV.from_string(source).render(variables)
    except jinja2.TemplateSyntaxError as exc:
        raise TaskfitError(f"{where}: template syntax error on its line {exc.lineno}: {exc.message}.") from None
    except jinja2.UndefinedError as exc:
        raise TaskfitError(f"{where}: {exc.message}. Variables available: {', '.join(variables)}.") from None
