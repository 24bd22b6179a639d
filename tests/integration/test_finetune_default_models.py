"""Fine-tuning end to end on the real models (MiniLM, SmolLM2-135M) with data we wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForTokenClassification

import taskfit

EXAMPLES = Path(__file__).parents[2] / "examples"
pytestmark = pytest.mark.slow


def test_token_classification_lora_on_minilm(tmp_path):
    results = taskfit.run(EXAMPLES / "ner.yaml", out=tmp_path, only=["lora-minilm"])
    metrics = results["lora-minilm"]
    assert metrics["n"] == 30 and metrics["token_accuracy"] > 0.8
    manifest = json.loads((tmp_path / "lora-minilm" / "manifest.json").read_text())
    info = manifest["finetune"]
    assert info["merge_max_abs_diff"] < 1e-4
    assert 0 < manifest["trainable_parameters"] < info["total_parameters"] / 10
    AutoModelForTokenClassification.from_pretrained(tmp_path / "lora-minilm" / "model")  # a plain transformers folder


def test_generation_sft_on_the_default_model(tmp_path):
    results = taskfit.run(EXAMPLES / "capitals.yaml", out=tmp_path, only=["lora-sft"])
    assert results["lora-sft"]["n"] == 16
    rows = [json.loads(x) for x in (tmp_path / "lora-sft" / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(r["prediction"], str) for r in rows)
    info = json.loads((tmp_path / "lora-sft" / "manifest.json").read_text())["finetune"]
    assert info["masked_example"].startswith("[Country:")  # the prompt part is shown as masked
    assert results["lora-sft"]["exact_match"] > 0.3
