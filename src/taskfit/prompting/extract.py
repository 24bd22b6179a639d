"""Answer extraction and voting: small pure functions over generated text.

- `extract` returns the first capture group of the *first* match of the pattern (so a model
  that keeps writing after its answer does not override it), or None when nothing matches.
- `match_option` maps an extracted string to an option by its answer strings, comparing
  case-insensitively after Unicode normalization (NFKC) with surrounding whitespace and
  punctuation removed; None when no option matches or several do.
- `majority_vote` picks the most frequent option; ties go to the option that appeared first
  among the samples. Failed samples (None) count in the agreement's denominator.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence


def extract(text: str, pattern: re.Pattern[str] | None) -> str | None:
    if pattern is None:
        return text.strip()
    found = pattern.search(text)
    return found.group(1) if found and found.group(1) is not None else None


def canonical(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().strip()
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return " ".join(text[start:end].split())


def _is_edge(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith(("P", "S"))


def match_option(extracted: str | None, options: Sequence[Sequence[str]]) -> int | None:
    """The index of the one option whose answer strings include `extracted`, else None."""
    if extracted is None:
        return None
    wanted = canonical(extracted)
    hits = [i for i, strings in enumerate(options) if any(canonical(s) == wanted for s in strings)]
    return hits[0] if len(hits) == 1 else None


def majority_vote(choices: Sequence[int | None]) -> tuple[int | None, float]:
    """(winner, agreement): the most frequent non-None choice and its share of all samples."""
    counts = Counter(c for c in choices if c is not None)
    if not counts:
        return None, 0.0
    top = max(counts.values())
    winner = next(c for c in choices if c is not None and counts[c] == top)
    return winner, top / len(choices)


def vote_shares(choices: Sequence[int | None], n_options: int) -> list[float]:
    """The share of samples that chose each option (failed samples choose none)."""
    return [sum(c == i for c in choices) / len(choices) for i in range(n_options)]


def majority_text(texts: Sequence[str]) -> tuple[str, float]:
    """For free text: the most frequent answer, as exact match compares answers
    (`normalize_answer`: case, punctuation, articles, spaces), returned as first written; an
    empty answer wins only when every sample is empty. Ties go to the first written."""
    from taskfit.evaluation.text_metrics import normalize_answer

    keys = [normalize_answer(t) for t in texts]
    counts = Counter(k for k in keys if k) or Counter(keys)
    top = max(counts.values())
    index = next(i for i, k in enumerate(keys) if k in counts and counts[k] == top)
    return texts[index], top / len(texts)
