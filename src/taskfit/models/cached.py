"""An LM wrapper that remembers every result in the run folder's cache (see store.py), so
interrupted runs resume and changed configs recompute only what changed."""

from __future__ import annotations

import contextlib
from typing import Any

from taskfit.models.base import LM, ExactRequest, GenerationRequest, Request
from taskfit.store import ScoreCache


class CachedLM:
    def __init__(self, lm: LM, cache: ScoreCache):
        self.lm = lm
        self.cache = cache
        self.computed = 0
        """Requests that reached the model (not answered from the cache)."""

    @property
    def identity(self) -> dict[str, Any]:
        return self.lm.identity

    def session(self) -> Any:
        """The backend's context for a run of calls (see `HFLM.session`), if it has one."""
        session = getattr(self.lm, "session", None)
        return session() if session else contextlib.nullcontext()

    def chat(self, user_message: str) -> str:
        return self.lm.chat(user_message)

    def loglikelihood(self, requests: list[Request]) -> list[float]:
        return self._through_cache(requests, self.lm.loglikelihood)

    def loglikelihood_exact(self, requests: list[Request]) -> list[float]:
        def compute(exact: list[ExactRequest]) -> list[float]:
            return self.lm.loglikelihood_exact([Request(*r) for r in exact])

        return self._through_cache([ExactRequest(*r) for r in requests], compute)

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        return [list(texts) for texts in self._through_cache(requests, self.lm.generate)]

    def _through_cache(self, requests: list, compute) -> list:
        """Results from the cache; the rest computed in one call (in first-seen order) and remembered."""
        wanted = list(dict.fromkeys(requests))
        known = self.cache.get_many(wanted)
        missing = [r for r in wanted if r not in known]
        if missing:
            fresh = dict(zip(missing, compute(missing)))
            self.cache.add(fresh)
            known.update(fresh)
            self.computed += len(missing)
        return [known[r] for r in requests]
