"""Chain of thought and self-consistency on the real default model, with the yes/no
questions and rationales we wrote (examples/yesno_*.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import taskfit
from taskfit.models.base import GenerationRequest

EXAMPLES = Path(__file__).parents[2] / "examples"
pytestmark = pytest.mark.slow


def test_zero_shot_cot_and_voting_end_to_end(tmp_path):
    results = taskfit.run(EXAMPLES / "yesno_cot.yaml", out=tmp_path)
    assert set(results) == {"zero-shot", "cot", "cot-vote"}
    n = len(taskfit.load_task(EXAMPLES / "yesno_cot.yaml").split("test"))
    assert n >= 30 and all(r["n"] == n for r in results.values())
    assert 0 <= results["cot"]["extraction_failed"] <= 1
    assert 0 < results["cot-vote"]["vote_agreement"] <= 1
    rows = [json.loads(x) for x in (tmp_path / "cot-vote" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(r["generations"]) == 8 for r in rows)
    assert "So the answer is" in rows[0]["prompt"]  # rationale demonstrations


def test_sampling_is_seeded_and_greedy_is_not(default_lm_float32):
    lm = default_lm_float32
    req = GenerationRequest("Q: Is fire hot?\nA:", max_new_tokens=12, temperature=0.8, samples=4, seed=1)
    first, again = lm.generate([req]), lm.generate([req])
    other = lm.generate([req._replace(seed=2)])
    assert first == again and first != other
    greedy = GenerationRequest("Q: Is fire hot?\nA:", max_new_tokens=12)
    assert lm.generate([greedy]) == lm.generate([greedy._replace(seed=5)])
