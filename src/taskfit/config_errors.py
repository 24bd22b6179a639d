"""pydantic's validation errors of an experiment file, as messages that name the file, the line
and the field, say what was expected, and suggest the key meant (`explain`); and the line of
every key in the file (`key_lines`), which also refuses a key given twice."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from taskfit.errors import TaskfitError, did_you_mean


def explain(exc: ValidationError, path: Path, lines: dict[tuple, int], raw: Any) -> str:
    """Turn pydantic's errors into one message per problem, with YAML line numbers."""
    messages = []
    for loc, errors in _problems(exc.errors(), raw).items():
        line = _nearest_line(loc, lines)
        at = f"{path}, line {line}" if line else str(path)
        messages += [f"{at}: {m}" for m in _describe(loc, errors)]
    return "\n".join(dict.fromkeys(messages))


def _problems(errors: list[dict], raw: Any) -> dict[tuple, list[dict]]:
    """pydantic's errors grouped by the place in the file they concern. The tags pydantic adds to
    a location for each member of a union (`str`, `list[int]`) name no key of the file: errors that
    differ only in them are one problem, and a member that failed on an item inside the value
    explains it better than the members that rejected the value whole."""
    found: dict[tuple, list[dict]] = {}
    tagged = set()
    for err in errors:
        loc, node = [], raw
        for i, part in enumerate(err["loc"]):
            if isinstance(node, dict) and part in node:
                part = next(k for k in node if k == part)  # the file's key (pydantic writes `true` as 1)
                loc, node = loc + [part], node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                loc, node = loc + [part], node[part]
            elif err["type"] == "missing" and i == len(err["loc"]) - 1:
                loc.append(part)
            elif part != "[key]" and not str(part).startswith("function-"):
                tagged.add(tuple(loc))
        key = ("[key]",) if err["loc"][-1:] == ("[key]",) else ()  # a bad key and its value are two problems
        found.setdefault(tuple(loc) + key, []).append(err)
    deeper = {loc[:n] for loc in found if loc[-1:] != ("[key]",) for n in range(len(loc))}
    return {loc: errs for loc, errs in found.items() if not (loc in tagged and loc in deeper)}


_EXPECTED = {
    "string_type": "text",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}


def _describe(loc: tuple, errors: list[dict]) -> list[str]:
    """One plain sentence per problem at `loc` (several only when pydantic found unrelated ones)."""
    where = _dotted(loc)
    first = errors[0]
    if first["type"] == "extra_forbidden":
        options = _fields_at(loc[:-1])
        hint = did_you_mean(str(loc[-1]), options) if options else ""
        valid = f" Valid keys here: {', '.join(sorted(options))}." if options else ""
        return [f"unknown key `{where}`.{hint}{valid}"]
    if first["type"] == "missing":
        return [f"`{where}` is required but missing."]
    if loc[-1:] == ("[key]",):
        return [f"`{_dotted(loc[:-2])}`: the key {_shown(loc[-2])} must be text.{_quote(loc[-2])}"]
    expected = list(dict.fromkeys(_expected(e) for e in errors))
    if all(expected):
        value, hint = first["input"], ""
        if first["type"] == "literal_error" and isinstance(value, str):
            hint = did_you_mean(value, re.findall(r"'([^']*)'", first["ctx"]["expected"]))
        quote = _quote(value, "text" in expected)
        return [f"`{where}`: expected {' or '.join(expected)}, got {_shown(value)}.{hint}{quote}"]
    field = f"`{where}`: " if loc else ""
    messages = []
    for err in errors:
        if err["type"] == "too_short":
            n = err["ctx"]["min_length"]
            messages.append(
                f"{field}needs at least {n} {'entry' if n == 1 else 'entries'}; it has {len(err['input'])}."
            )
            continue
        got, message = err.get("input"), err["msg"].removeprefix("Value error, ")
        shown = "" if got is None or isinstance(got, dict | list) or repr(got) in message else f" (got {got!r})"
        messages.append(f"{field}{message}{shown}.")
    return messages


def _dotted(loc: tuple) -> str:
    return ".".join(_shown(p) if isinstance(p, bool) else str(p) for p in loc)


def _expected(err: dict) -> str:
    """What a type or choice error wanted, in words ('' for other errors)."""
    if err["type"] == "literal_error":
        return err["ctx"]["expected"]
    return _EXPECTED.get(err["type"], "")


def _shown(value: Any) -> str:
    """A value as it reads in YAML."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


def _quote(value: Any, text_expected: bool = True) -> str:
    """Where YAML read an unquoted word or number as a boolean or number, say how to keep it text."""
    if not text_expected or not isinstance(value, bool | int | float):
        return ""
    if isinstance(value, bool):
        return ' YAML reads an unquoted yes, no, true, false, on or off as a boolean: quote it, e.g. "yes".'
    return f' YAML reads an unquoted number as a number: quote it, e.g. "{value}".'


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the schema object found at `loc` (for did-you-mean)."""
    from taskfit.config import ExperimentConfig, RunConfig  # the schema, loaded by the time errors come

    model: Any = ExperimentConfig
    for part in loc:
        if model is ExperimentConfig and part == "runs":
            model = dict
            continue
        if model is dict:
            model = RunConfig
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML to its 1-based line."""
    out: dict[tuple, int] = {}

    def walk(node: yaml.Node, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = prefix + (key.value,)
                if here in out:  # PyYAML keeps the last one silently: a copied run would vanish
                    dotted = ".".join(map(str, here))
                    raise TaskfitError(
                        f"`{dotted}` appears twice (lines {out[here]} and {key.start_mark.line + 1}); "
                        "the second would silently replace the first. Rename or remove one."
                    )
                out[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out[prefix + (i,)] = item.start_mark.line + 1
                walk(item, prefix + (i,))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return out


def _nearest_line(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None
