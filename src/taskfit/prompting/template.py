"""Jinja2 templates with one `{{ answer }}` slot.

The template is rendered in a sandbox with undefined variables as errors. The slot is
found by rendering with a sentinel in its place: the text before it is the context; the
answer plus the text after it (a cloze prompt) is the continuation that gets scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from taskfit.data import Example
from taskfit.errors import TaskfitError

_SLOT = "\x00taskfit-answer\x00"


class _Unprintable(Exception):
    """A `{{ ... }}` that would print a null or a whole list or mapping ("None", "['a', 'b']")."""

    def __init__(self, value: Any):
        self.value = value


def _printable(value: Any) -> Any:
    if value is None or isinstance(value, list | tuple | dict):
        raise _Unprintable(value)
    return value


_ENV = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False, finalize=_printable
)


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
        tree = _ENV.parse(source)
        self.lead = _lead(tree)
        """The literal text every rendering starts with, before the first variable or tag
        ("Question: "); empty where the template starts with one."""
        self.used = meta.find_undeclared_variables(tree)

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
        except _Unprintable as exc:
            message = _unprintable(exc.value, example.fields, self.where, self.used)
            raise TaskfitError(f"{example.source}: {message}") from None
        except Exception as exc:  # the template's own expression failed (`{{ 1/0 }}`, `{{ text + 1 }}`)
            raise TaskfitError(
                f"{self.where}: rendering failed for example {example.id} ({example.source}): "
                f"{type(exc).__name__}: {exc}. Fix the template's expression."
            ) from None
        parts = text.split(_SLOT)
        if len(parts) != 2:
            raise TaskfitError(
                f"{self.where}: the template must contain the answer slot `{{{{ answer }}}}` exactly once "
                f"(found it {len(parts) - 1} times)."
            )
        return Rendered(parts[0], parts[1])


def _unprintable(value: Any, fields: dict[str, Any], where: str, used: set[str] | None = None) -> str:
    """Why a value cannot be printed, naming the field(s) of the row that hold it."""
    named = [f"'{k}'" for k, v in fields.items() if v is value and (used is None or k in used or "example" in used)]
    field = f"field {' or '.join(named)}" if named else "a value"
    if value is None:
        return f"{field} is null, which {where} would print as 'None'. Fill in the field, or remove the row."
    return (
        f"{field} is a {type(value).__name__}, which {where} would print as {str(value)[:60]!r}. "
        "Print its items instead, e.g. `{{ " + (named[0].strip("'") if named else "items") + "|join(', ') }}`."
    )


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
    except _Unprintable as exc:
        raise TaskfitError(_unprintable(exc.value, variables, where)) from None
    except Exception as exc:  # any other failure of the template's own expressions
        raise TaskfitError(f"{where}: rendering failed: {type(exc).__name__}: {exc}. Fix the template.") from None
