"""The verbalizer: the answer strings of each option, and how their scores combine."""

from __future__ import annotations

import math

from taskfit.errors import TaskfitError, did_you_mean


def answer_strings(labels: tuple[str, ...], answers: dict[str, str | list[str]] | None, where: str) -> list[list[str]]:
    """Answer strings per label, in label order; a label without an entry answers by its name."""
    answers = answers or {}
    for label in answers:
        if label not in labels:
            raise TaskfitError(
                f"{where}.answers: '{label}' is not one of the task's labels ({', '.join(labels)})."
                f"{did_you_mean(label, labels)}"
            )
    out = []
    for label in labels:
        strings = answers.get(label, [label])
        strings = [strings] if isinstance(strings, str) else list(strings)
        if not strings or any(s == "" for s in strings):
            raise TaskfitError(
                f"{where}.answers: label '{label}' has no usable answer string. Give it one or more non-empty strings."
            )
        out.append(strings)
    seen: dict[str, str] = {}
    for label, strings in zip(labels, out):
        for s in strings:
            if s in seen and seen[s] != label:
                raise TaskfitError(
                    f"{where}.answers: the answer '{s}' is given for both '{seen[s]}' and '{label}'; "
                    "the model could not tell these labels apart."
                )
            seen[s] = label
    return out


def combine(scores: list[float], how: str) -> float:
    """One score from several answer strings' log-likelihoods: log-sum-exp or mean."""
    if len(scores) == 1:
        return scores[0]
    if how == "mean":
        return sum(scores) / len(scores)
    top = max(scores)
    return top + math.log(sum(math.exp(s - top) for s in scores))
