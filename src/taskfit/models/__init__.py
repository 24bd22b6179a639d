"""Language models behind one small contract (see `base.LM`)."""

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from taskfit.models.base import LM, Request
from taskfit.models.registry import ALIASES, resolve

__all__ = ["ALIASES", "LM", "Request", "frozen_load", "load_model", "paused_collector", "resolve"]


def load_model(config=None) -> LM:
    """Load a model from a `ModelConfig`, a model name (alias, folder, .gguf file or hub id) or the
    `model:` mapping of an experiment file (default: the default model, dtype auto)."""
    with paused_collector():  # the first call imports torch and the model's code from transformers
        from taskfit.models.hf import HFLM

        return HFLM.load(_model_config(config))


def _model_config(config):
    import os

    import pydantic

    from taskfit.config import ModelConfig
    from taskfit.errors import TaskfitError

    if config is None or isinstance(config, ModelConfig):
        return config or ModelConfig()
    if isinstance(config, str | os.PathLike):
        config = {"name": os.fspath(config)}
    if not isinstance(config, dict):
        raise TaskfitError(f"load_model: give a ModelConfig, a model name or a dict of its fields, not {config!r}.")
    try:
        return ModelConfig(**config)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"model.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise TaskfitError(f"load_model: {problems}.") from None


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


@contextmanager
def frozen_load(load: Callable[[], LM]) -> Iterator[LM]:
    """Within: the LM that `load()` returns, everything that exists once it has loaded (the model
    and the modules imported for it: about a million objects on the default model) left out of
    the cyclic garbage collector's walks (`gc.freeze`); after: back in, so that the model, which
    holds reference cycles, can be collected once released. Made while the collector is paused
    (`paused_collector`), they would all be young, and its next three collections would walk
    every one of them to find nothing (~0.7 s on the default CPU). Where something had frozen
    objects before, they stay frozen."""
    with paused_collector():
        before = gc.get_freeze_count()
        lm = load()
        gc.freeze()
    try:
        yield lm
    finally:
        if not before:
            gc.unfreeze()
