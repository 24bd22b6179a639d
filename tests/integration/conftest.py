import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_lm_float32():
    """The real default model in float32 (converted once into the user cache)."""
    from taskfit.config import ModelConfig
    from taskfit.models import load_model

    return load_model(ModelConfig(dtype="float32"))
