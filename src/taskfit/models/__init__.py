"""Language models behind one small contract (see `base.LM`)."""

from taskfit.models.base import LM, Request
from taskfit.models.registry import ALIASES, resolve

__all__ = ["ALIASES", "LM", "Request", "load_model", "resolve"]


def load_model(config=None) -> LM:
    """Load a model from a `ModelConfig` (default: the default model, dtype auto)."""
    from taskfit.config import ModelConfig
    from taskfit.models.hf import HFLM

    return HFLM.load(config or ModelConfig())
