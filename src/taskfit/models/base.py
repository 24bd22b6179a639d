"""The model contract, after lm-evaluation-harness: a list of requests in, a list of
results out. Backends batch, sort and cache behind it; prompting code never sees tensors."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol


class Request(NamedTuple):
    context: str
    continuation: str


class LM(Protocol):
    identity: dict[str, Any]
    """What the manifest records about the model: name, source, file hash, dtype, device."""

    def loglikelihood(self, requests: list[Request]) -> list[float]:
        """Summed log-probability of each continuation given its context."""
        ...

    def chat(self, user_message: str) -> str:
        """The prompt text that asks the model to reply to `user_message` as a chat assistant."""
        ...
