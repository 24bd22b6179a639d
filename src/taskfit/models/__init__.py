"""Language models behind one small contract (see `base.LM`)."""

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from taskfit.models.base import LM, Request
from taskfit.models.registry import ALIASES, resolve

__all__ = ["ALIASES", "LM", "Request", "load_model", "paused_collector", "resolve"]


def load_model(config=None) -> LM:
    """Load a model from a `ModelConfig` (default: the default model, dtype auto)."""
    from taskfit.config import ModelConfig

    with paused_collector():  # the first call imports torch and the model's code from transformers
        from taskfit.models.hf import HFLM

        return HFLM.load(config or ModelConfig())


@contextmanager
def paused_collector() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (as it was before, after).

    Importing torch and transformers' model code makes about a million long-lived objects;
    with the collector on, the collections they trigger re-walk all of them again and again
    (~0.6 s of the ~3 s of imports on the default CPU). Nothing collectable is made meanwhile."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
