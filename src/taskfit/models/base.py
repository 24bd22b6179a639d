"""The model contract, after lm-evaluation-harness: a list of requests in, a list of
results out. Backends batch, sort and cache behind it; prompting code never sees tensors."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol


class Request(NamedTuple):
    context: str
    continuation: str
    shared: int = 0
    """How many leading characters of `context` every example of the run has (the chat header,
    fixed demonstrations): the scorer computes them once and each request's own tokens after
    them. Where that start ends moves scores at rounding level, so it belongs to the request,
    not to the call it is scored in."""


class ExactRequest(NamedTuple):
    """A `Request` scored in float32 where the model otherwise computes in bf16 (`LM.loglikelihood_exact`);
    its own type, so that the cache keeps its result apart from the bf16 one."""

    context: str
    continuation: str
    shared: int = 0


class GenerationRequest(NamedTuple):
    """Continue `context`; `samples` continuations, each cut before the first `stop` string or at EOS."""

    context: str
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    samples: int = 1
    seed: int = 0
    shared: int = 0
    """How many leading characters of `context` other requests share (fixed demonstrations):
    the generator computes them once and each prompt's own tokens after them. Where the split
    falls changes results at rounding level, so it belongs to the request."""


def top_gap(values: Iterable[float]) -> float:
    """How far the best of `values` lies above the second best (inf with fewer than two): the
    near-tie test of the float32 recheck, for answer strings' scores and for options' log-probabilities."""
    best = heapq.nlargest(2, values)
    return best[0] - best[1] if len(best) == 2 else math.inf


class LM(Protocol):
    identity: dict[str, Any]
    """What the manifest records about the model: name, source, file hash, dtype, device."""

    def loglikelihood(self, requests: list[Request]) -> list[float]:
        """Summed log-probability of each continuation given its context."""
        ...

    def loglikelihood_exact(self, requests: list[Request]) -> list[float]:
        """The same in the weights' float32, for a backend that otherwise computes in bf16 (it then
        names its `recheck_margin` in `identity`): the scores a float32 run gives."""
        ...

    def chat(self, user_message: str) -> str:
        """The prompt text that asks the model to reply to `user_message` as a chat assistant."""
        ...

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """For each request, `samples` generated continuations (text only, without the prompt,
        cut before the first stop string, which is not included; generation also ends at EOS).
        The same request and seed give the same texts whatever else is in the list."""
        ...
