"""Token classification (named entities, chunks, part of speech): one tag per token.

A row holds a list of tokens (field `task.tokens`) and a list of tags (field `task.label`),
one tag per token. Either field may also be a string, because CSV cells cannot hold lists:
a string starting with `[` is read as a JSON list, any other string is split on whitespace.

Tag schemes, decided by the tag set:
- prefixed: `B-`/`I-` (BIO, IOB2) and optionally `E-`/`S-` (IOBES), with `O` outside; a
  tag set with `I-` tags only is IO (predicted entities are then written with `I-` only);
- plain: each token tagged with its entity type alone (`PER`, `LOC`) and `O` outside.
  Adjacent tokens of one type form one entity (the IO scheme): for entity scoring the plain
  tag `PER` is read as `I-PER`, so two neighbouring entities of one type merge into one.
A tag set that mixes both is an error (it is usually a typo).

The tag set is `task.tags` in that order, else the tags of the train split (the test split
when there is no train split): `O` first, then grouped by entity type (sorted) and prefix
(B, I, E, S). A tag of any split outside the tag set is an error.

Examples: `options` is the tag set, `gold` is 0 (unused); `fields[task.tokens]` and
`fields[task.label]` hold the token and tag lists (always lists of strings), and
`fields["text"]` the tokens joined by spaces for templates (`{{ text }}`), unless the row
has a `text` field of its own, which then wins (when `task.tokens` is `text` itself, the field
holds the token list and prompts still render `{{ text }}` as the joined tokens).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from taskfit.config import TaskConfig
from taskfit.data import Example
from taskfit.data.readers import Record
from taskfit.errors import TaskfitError

OUTSIDE = "O"
_PREFIXED = re.compile(r"^([BIES])-(.+)$", re.DOTALL)
_PREFIX_ORDER = {"B": 0, "I": 1, "E": 2, "S": 3}

Scheme = Literal["bio", "iob1", "io", "iobes", "plain"]
Span = tuple[str, int, int]
"""(entity type, first token, last token), the last inclusive as in seqeval."""


# --------------------------------------------------------------------------- reading rows


def parse_list(value: Any, source: str, field: str, what: str) -> list[str]:
    """A list of non-empty strings from a list, a JSON list in a string, or a whitespace-separated string."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TaskfitError(
                    f"{source}: field '{field}' looks like a JSON list of {what} but is not valid JSON ({exc.msg})."
                ) from None
        else:
            value = text.split()
    if not isinstance(value, list | tuple):
        raise TaskfitError(
            f"{source}: field '{field}' must be a list of {what} (or a whitespace-separated string), "
            f"got {type(value).__name__} {value!r}."
        )
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            shown = f"{type(item).__name__} {item!r}" if not isinstance(item, str) else "an empty string"
            raise TaskfitError(f"{source}: field '{field}' item {i} must be a non-empty string, got {shown}.")
    return list(value)


def tokens_and_tags(cfg: TaskConfig, record: Record) -> tuple[list[str], list[str]]:
    """The checked token and tag lists of one row."""
    from taskfit.tasks.base import require_field

    source, row = record
    tokens = parse_list(require_field(cfg.tokens, row, source, "task.tokens"), source, cfg.tokens, "tokens")
    tags = parse_list(require_field(cfg.label, row, source, "task.label"), source, cfg.label, "tags")
    if not tokens:
        raise TaskfitError(f"{source}: field '{cfg.tokens}' has no tokens. Remove the row or add its tokens.")
    if len(tokens) != len(tags):
        raise TaskfitError(
            f"{source}: {len(tokens)} tokens in '{cfg.tokens}' but {len(tags)} tags in '{cfg.label}'. "
            "Every token needs exactly one tag."
        )
    return tokens, tags


# --------------------------------------------------------------------------- the tag set


def tag_space(cfg: TaskConfig, records: dict[str, list[Record]]) -> tuple[list[str], str]:
    """(tags, where they come from): `task.tags`, or the tags of the train split (else test)
    in canonical order."""
    if cfg.tags:
        duplicated = sorted({t for t in cfg.tags if cfg.tags.count(t) > 1})
        if duplicated:
            raise TaskfitError(f"task.tags: the tag set lists {', '.join(map(repr, duplicated))} more than once.")
        tag_scheme(cfg.tags, "task.tags")
        return list(cfg.tags), "`task.tags`"
    split = "train" if "train" in records else "test"
    found = {tag for record in records[split] for tag in tokens_and_tags(cfg, record)[1]}
    tags = sorted(found, key=_tag_order)
    origin = f"the tags of the {split} split"
    tag_scheme(tags, origin)
    return tags, origin


def _tag_order(tag: str) -> tuple:
    if tag == OUTSIDE:
        return (0, "", 0)
    m = _PREFIXED.match(tag)
    return (1, m.group(2), _PREFIX_ORDER[m.group(1)]) if m else (1, tag, 0)


def tag_scheme(tags: list[str] | tuple[str, ...], where: str = "task.tags") -> Scheme:
    """`bio`, `io` or `iobes` when every tag but `O` has a prefix, `plain` when none has one."""
    entity_tags = [t for t in tags if t != OUTSIDE]
    prefixed = [t for t in entity_tags if _PREFIXED.match(t)]
    if prefixed and len(prefixed) != len(entity_tags):
        plain = [t for t in entity_tags if not _PREFIXED.match(t)]
        raise TaskfitError(
            f"{where}: mixes prefixed tags ({', '.join(prefixed[:3])}) with plain ones ({', '.join(plain[:3])}). "
            "Use BIO tags (B-PER, I-PER, O) or plain tags (PER, O) throughout."
        )
    if not prefixed:
        return "plain"
    if any(t[0] in "ES" for t in prefixed):
        return "iobes"
    return "bio" if any(t[0] == "B" for t in prefixed) else "io"


def task_scheme(task) -> Scheme:
    """The scheme predictions are written in: the tag set's (`tag_scheme`), where BIO tags are
    used as IOB1 by the data (an entity may start with `I-`; `B-` only starts one right after
    another of its type) `iob1`, so that predictions agree with gold token by token."""
    scheme = tag_scheme(task.tags or ())
    if scheme == "bio" and any(
        _starts_inside(tags_of(ex, task.config)) for split in ("train", "dev", "test") for ex in task.split(split)
    ):
        return "iob1"
    return scheme


def _starts_inside(tags: list[str]) -> bool:
    previous = OUTSIDE
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            return True
        previous = tag
    return False


def entity_types(tags: tuple[str, ...] | list[str]) -> list[str]:
    """The entity types of a tag set, in the order they first appear."""
    types: dict[str, None] = {}
    for tag in tags:
        if tag != OUTSIDE:
            m = _PREFIXED.match(tag)
            types[m.group(2) if m else tag] = None
    return list(types)


# --------------------------------------------------------------------------- examples


def to_example(cfg: TaskConfig, tags: list[str], record: Record, split: str, origin: str) -> Example:
    """`origin`: where the tag set comes from (`tag_space`), for the error message."""
    from taskfit.tasks.base import example_id

    source, row = record
    tokens, gold = tokens_and_tags(cfg, record)
    allowed = set(tags)
    for i, tag in enumerate(gold):
        if tag not in allowed:
            raise TaskfitError(
                f"{source}: tag '{tag}' of token {i} ('{tokens[i]}') in field '{cfg.label}' is not in {origin} "
                f"({', '.join(tags)}). Fix the row, or list the full tag set under `task.tags`."
            )
    fields = {**row, cfg.tokens: tokens, cfg.label: gold}
    if cfg.tokens != "text":  # a tokens field named `text` holds the list; templates still see the sentence
        fields.setdefault("text", " ".join(tokens))
    return Example(id=example_id(cfg, row, source, split), fields=fields, options=tuple(tags), gold=0, source=source)


def tokens_of(example: Example, cfg: TaskConfig) -> list[str]:
    return example.fields[cfg.tokens]


def tags_of(example: Example, cfg: TaskConfig) -> list[str]:
    return example.fields[cfg.label]


# --------------------------------------------------------------------------- entities <-> tags


def for_seqeval(tags: list[str]) -> list[str]:
    """Plain tags as IO tags (`PER` -> `I-PER`), which seqeval reads; prefixed tags unchanged."""
    return [t if t == OUTSIDE or _PREFIXED.match(t) else f"I-{t}" for t in tags]


def spans(tags: list[str]) -> list[Span]:
    """The entities of one tag sequence, decoded as seqeval's default (conlleval) mode does."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [(t, s, e) for t, s, e in get_entities(for_seqeval(list(tags)))]


def encode(found: list[Span], length: int, scheme: Scheme) -> list[str]:
    """Tags for `length` tokens with the entities `found` (non-overlapping), in `scheme`."""
    tags = [OUTSIDE] * length
    for kind, start, end in sorted(found, key=lambda span: span[1]):
        for i in range(start, end + 1):
            if scheme == "plain":
                tags[i] = kind
            elif scheme == "io":
                tags[i] = f"I-{kind}"
            elif scheme == "iobes" and start == end:
                tags[i] = f"S-{kind}"
            elif scheme == "iob1":  # B- only where an entity of its type ends right before
                after_same = i == start and start > 0 and tags[start - 1][2:] == kind
                tags[i] = f"B-{kind}" if after_same else f"I-{kind}"
            elif i == start:
                tags[i] = f"B-{kind}"
            else:
                tags[i] = f"E-{kind}" if scheme == "iobes" and i == end else f"I-{kind}"
    return tags
