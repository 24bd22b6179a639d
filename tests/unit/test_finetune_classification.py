"""Classification fine-tuning on tiny models built from configs: full and LoRA, encoder and
decoder; merge check and export; seeds, resume, and the errors users can hit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from helpers.finetune import (  # noqa: F401  (autouse fixture)
    PRECISION,
    SETTINGS,
    job_from_spec,
    killed_after_first_checkpoint,
    one_thread,
    run_on_two_processes,
)
from helpers.tiny import build_tiny_model
from helpers.tiny_encoder import build_tiny_encoder, build_tiny_xlnet
from taskfit.config import ModelConfig, TaskConfig
from taskfit.errors import TaskfitError
from taskfit.finetuning import FinetuneJob, common, data, training
from taskfit.finetuning.recipes import run
from taskfit.tasks import Task

LABELS = ["negative", "positive"]
WORDS = {"positive": ["good", "great", "nice"], "negative": ["bad", "terrible", "awful"]}
NOUNS = "food service room staff movie book film show meal trip day hotel place".split()


def _rows(n: int, split: str, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        label = LABELS[i % 2]
        out.append(
            {"id": f"{split}{i}", "text": f"the {rng.choice(NOUNS)} was {rng.choice(WORDS[label])}", "label": label}
        )
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(0)
    for split, n in (("train", 64), ("test", 16)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, split, rng)))
    build_tiny_encoder(root / "encoder")
    build_tiny_model(root / "decoder")
    build_tiny_xlnet(root / "xlnet")
    return root


def make_job(root: Path, folder: str, model: str = "encoder", dtype: str = PRECISION, **finetune) -> FinetuneJob:
    task = {"type": "classification", "data": {"train": "train.jsonl", "test": "test.jsonl"}, "dev_fraction": 0.25}
    return job_from_spec(root, folder, task, finetune, root / model, dtype)


@pytest.fixture(scope="module")
def results(root):
    """Each (model, method) trained once, on demand, shared by the tests below."""
    cache = {}

    def get(model: str, method: str):
        if (model, method) not in cache:
            cache[model, method] = run(make_job(root, f"{model}-{method}", model, **SETTINGS[method]))
        return cache[model, method]

    return get


@pytest.mark.parametrize("model", ["encoder", "decoder"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_learns_and_rows_are_well_formed(root, results, model, method):
    result = results(model, method)
    assert sum(r["correct"] for r in result.rows) / len(result.rows) >= 0.85
    assert [r["id"] for r in result.rows] == [f"test{i}" for i in range(16)]
    for row in result.rows:
        assert set(row) == {"id", "label", "prediction", "correct", "scores", "probabilities", "prompt"}
        assert row["label"] in LABELS and row["prediction"] in LABELS
        assert row["correct"] == (row["label"] == row["prediction"])
        assert len(row["scores"]) == len(row["probabilities"]) == 2
        assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-6)
        assert row["prediction"] == LABELS[max(range(2), key=row["scores"].__getitem__)]
        assert row["prompt"].startswith("the ")
    info = result.info
    assert info["train_examples"] == 48 and info["dev_examples"] == 16
    assert info["best_dev_accuracy"] >= 0.85 and info["epochs_run"] > 0 and info["train_tokens_per_s"] > 0
    assert info["peak_memory_mb"] > 0 and info["train_time_s"] > 0
    assert info["train_tokens"] == 12 * _train_tokens(root, model)  # 12 epochs of non-padding tokens
    if method == "lora":
        assert info["trainable_parameters"] < info["total_parameters"] / 4
    else:
        assert info["trainable_parameters"] == info["total_parameters"]
        assert info["merge_max_abs_diff"] is None
    assert not (root / f"{model}-{method}" / "checkpoints").exists()  # removed after the export


def _train_tokens(root: Path, model: str) -> int:
    from transformers import AutoTokenizer

    job = make_job(root, "count", model, **SETTINGS["full"])
    train, _ = data.train_and_dev(job.task, job.seed, job.where, key=lambda ex: ex.gold)
    tokenizer = AutoTokenizer.from_pretrained(root / model)
    return sum(len(tokenizer(ex.fields["text"])["input_ids"]) for ex in train)


@pytest.mark.parametrize("model", ["encoder", "decoder"])
def test_merged_export_reloads_with_transformers_alone(root, results, model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = results(model, "lora")
    assert 0 <= result.info["merge_max_abs_diff"] < common.MERGE_TOLERANCE
    folder = Path(result.info["model_folder"])
    assert not (folder / "adapter_config.json").exists()  # a plain transformers folder, no peft needed
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert reloaded.config.id2label == dict(enumerate(LABELS))
    _same_predictions(reloaded, tokenizer, result.rows, bf16=result.info["dtype"] != "float32")


def _same_predictions(model, tokenizer, rows: list[dict], bf16: bool) -> None:
    model.eval()
    for row in rows[:6]:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = model(**tokenizer(row["prompt"], return_tensors="pt")).logits[0].float()
        assert logits.tolist() == pytest.approx(row["scores"], abs=1e-5)
        assert LABELS[int(logits.argmax())] == row["prediction"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_precision_follows_model_dtype(root, dtype, monkeypatch):
    """`model.dtype` picks bf16 autocast (float32 weights) or float32 for training and predictions;
    the export is float32 either way, and reproduces the rows under the same precision."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    job = make_job(root, f"encoder-{dtype}", dtype=dtype, **{**SETTINGS["lora"], "epochs": 2})
    seen = []
    original = training.arguments
    monkeypatch.setattr(training, "arguments", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    result = run(job)
    assert seen[0].bf16 is (dtype == "bfloat16")
    assert result.info["dtype"] == ("float32" if dtype == "float32" else "bfloat16 autocast, float32 weights")
    assert result.info["merge_max_abs_diff"] < common.MERGE_TOLERANCE  # compared in float32 either way
    folder = Path(result.info["model_folder"])
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
    assert reloaded.dtype == torch.float32
    _same_predictions(reloaded, AutoTokenizer.from_pretrained(folder), result.rows, bf16=dtype == "bfloat16")


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    from taskfit.models import hf

    for native in (True, False):
        monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda native=native: native)
        assert training.mixed_precision(ModelConfig(name="x", device="cpu")) is native
    assert training.mixed_precision(ModelConfig(name="x", device="cpu", dtype="float32")) is False


def test_same_seed_gives_identical_rows(root, results):
    again = run(make_job(root, "encoder-lora-again", **SETTINGS["lora"]))
    first = results("encoder", "lora")
    assert again.rows == first.rows
    assert again.info["best_dev_accuracy"] == first.info["best_dev_accuracy"]
    assert again.info["evaluations"] == first.info["evaluations"]


def test_killed_run_resumes_from_its_checkpoint_to_the_same_result(root, results):
    with killed_after_first_checkpoint():
        run(make_job(root, "encoder-lora-killed", **SETTINGS["lora"]))
    checkpoints = sorted((root / "encoder-lora-killed" / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-6"]  # 48 examples / 8 per batch, 12 epochs: every 6 steps

    resumed = run(make_job(root, "encoder-lora-killed", **SETTINGS["lora"]))
    uninterrupted = results("encoder", "lora")
    assert resumed.info["resumed_from_step"] == 6
    assert resumed.info["steps"] == uninterrupted.info["steps"]
    assert resumed.info["evaluations"] == uninterrupted.info["evaluations"]
    assert resumed.rows == uninterrupted.rows


def test_checkpoints_of_another_job_are_not_resumed(tmp_path):
    assert training.prepare_checkpoints(tmp_path, {"seed": 0}) is False
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir()
    assert training.prepare_checkpoints(tmp_path, {"seed": 0}) is True
    assert training.prepare_checkpoints(tmp_path, {"seed": 1}) is False
    assert not (tmp_path / "checkpoints" / "checkpoint-3").exists()


def test_lora_on_a_model_without_adaptable_layers_lists_its_layers(root):
    with pytest.raises(TaskfitError) as err:
        run(make_job(root, "xlnet-lora", "xlnet", **SETTINGS["lora"]))
    message = str(err.value)
    assert "runs.ft.finetune" in message and "xlnet" in message and "XLNetForSequenceClassification" in message
    assert "target_modules" in message and "layer_1" in message and "method: full" in message


def test_target_modules_that_match_nothing_list_the_layers(root):
    with pytest.raises(TaskfitError) as err:
        run(make_job(root, "encoder-bad-targets", **SETTINGS["lora"], target_modules=["q_proj"]))
    message = str(err.value)
    assert "['q_proj']" in message and "query" in message and "value" in message
    assert "classifier" not in message.split("layers:")[1]  # the head is trained anyway; not a choice


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_qlora_without_a_gpu_says_what_it_needs(root):
    with pytest.raises(TaskfitError, match=r"method: qlora.*CUDA GPU.*method: lora"):
        run(make_job(root, "encoder-qlora", **SETTINGS["lora"] | {"method": "qlora"}))


def test_every_task_type_has_a_recipe():
    from typing import get_args

    from taskfit.finetuning.recipes import RECIPES

    assert set(RECIPES) == set(get_args(TaskConfig.model_fields["type"].annotation))


HEAD = {"num_labels": 2, "id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}


def _trained_looking_adapter(root: Path, folder: str):
    """The tiny encoder with a LoRA adapter whose B matrices are random (B starts at zero, so an
    untrained adapter would merge to nothing), two tokenized inputs and their collator."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    job = make_job(root, folder, **SETTINGS["lora"])
    loaded = common.load(job, AutoModelForSequenceClassification, **HEAD)
    model = common.add_lora(job, loaded.model, "SEQ_CLS", loaded.heads)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    inputs, _ = data.tokenize(loaded.tokenizer, [("the food was good",), ("the room was awful",)], 32)
    return job, model, inputs, DataCollatorWithPadding(loaded.tokenizer)


def test_qlora_export_path_merges_the_adapter_on_a_float32_copy(root):
    from transformers import AutoModelForSequenceClassification

    job, model, inputs, collator = _trained_looking_adapter(root, "float32-copy")
    before = common.predict_logits(model, inputs, collator, 2)
    copy = common.float32_base(job, model, AutoModelForSequenceClassification, **HEAD)
    merged, diff = common.merge_checked(job, copy, inputs, collator)
    assert diff < common.MERGE_TOLERANCE
    assert torch.allclose(common.predict_logits(merged, inputs, collator, 2), before, atol=1e-5)


def test_dev_hold_out_is_stratified_seeded_and_keeps_every_class():
    items = [("a", i) for i in range(30)] + [("b", i) for i in range(10)] + [("c", 0)]
    kept, held = data.stratified_holdout(items, 0.2, seed=3, key=lambda x: x[0])
    assert sorted(kept + held) == sorted(items)
    assert [x[0] for x in held].count("a") == 6 and [x[0] for x in held].count("b") == 2
    assert ("c", 0) in kept  # a class with one example stays in train
    assert data.stratified_holdout(items, 0.2, seed=3, key=lambda x: x[0]) == (kept, held)
    assert data.stratified_holdout(items, 0.2, seed=4, key=lambda x: x[0]) != (kept, held)


def test_two_input_fields_are_read_as_a_text_pair(root):
    from transformers import AutoTokenizer

    cfg = TaskConfig(type="classification", data={"test": "x.jsonl"}, input=["premise", "hypothesis"])
    task = Task(config=cfg, splits={}, labels=tuple(LABELS))
    ex = type("Ex", (), {"fields": {"premise": "the food was good", "hypothesis": "nice"}, "source": "x:1"})()
    parts = data.input_parts(task, ex, "runs.ft.finetune")
    assert parts == ("the food was good", "nice") and data.prompt_of(parts) == "the food was good\nnice"
    features, truncated = data.tokenize(AutoTokenizer.from_pretrained(root / "encoder"), [parts], 6)
    assert truncated == 1 and len(features[0]["input_ids"]) == 6
    assert features[0]["token_type_ids"][-2:] == [1, 1]  # the second text keeps a token after truncation
    decoder = AutoTokenizer.from_pretrained(root / "decoder")  # no separator token: the pair is joined by a newline
    (joined,), _ = data.tokenize(decoder, [parts], 64)
    assert decoder.decode(joined["input_ids"], skip_special_tokens=True) == "the food was good\nnice"
    incomplete = type("Ex", (), {"fields": {"premise": "x"}, "source": "x:2"})()
    with pytest.raises(TaskfitError, match="x:2: this row has no field 'hypothesis'"):
        data.input_parts(task, incomplete, "runs.ft.finetune")


def test_heads_are_found_by_name_or_by_weights_new_at_loading(root):
    from transformers import AutoModelForSequenceClassification

    for model, heads in (
        ("encoder", ["classifier"]),
        ("decoder", ["score"]),
        ("xlnet", ["logits_proj", "sequence_summary"]),
    ):
        loaded = common.load(make_job(root, "heads", model, **SETTINGS["lora"]), AutoModelForSequenceClassification)
        assert loaded.heads == heads  # LoRA trains them in full: a frozen random head cannot learn


def test_a_merge_that_changes_the_logits_stops_the_run(root, monkeypatch):
    """A merged model that computes something else than the trained adapter is never exported."""
    job, model, inputs, collator = _trained_looking_adapter(root, "broken-merge")
    original = model.merge_and_unload

    def lossy_merge(*args, **kwargs):  # as if the update were scaled wrongly while merging
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict):
                module.scaling = {k: v * 0.5 for k, v in module.scaling.items()}
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "merge_and_unload", lossy_merge, raising=False)
    with pytest.raises(TaskfitError, match="changed the logits by up to") as caught:
        common.merge_checked(job, model, inputs, collator)
    assert "Nothing was exported" in str(caught.value) and "runs.ft.finetune" in str(caught.value)


def test_a_two_process_launch_trains_together_and_writes_once(root, tmp_path):
    """Under torchrun (as under `accelerate launch`), both processes train; the main one alone
    scores the prompted run, writes the files and prints the table."""
    spec = {
        "name": "mp",
        "task": {
            "type": "classification",
            "data": {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")},
            "dev_fraction": 0.25,
        },
        "models": [{"name": str(root / "encoder"), "dtype": "float32"}],
        "runs": {
            "ft": {"finetune": {**SETTINGS["full"], "epochs": 2}},
            "zs": {
                "model": {"name": str(root / "decoder"), "dtype": "float32"},
                "prompt": {"template": "{{ text }} It was {{ answer }}."},
            },
        },
    }
    done = run_on_two_processes(tmp_path, spec)
    assert done.stdout.count("Results written to") == 1
    out = tmp_path / "out"
    test_ids = [json.loads(line)["id"] for line in (root / "test.jsonl").read_text().splitlines()]
    for name in ("ft", "zs"):
        rows = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert [row["id"] for row in rows] == test_ids and len(rows) == 16
        assert json.loads((out / name / "manifest.json").read_text())["examples"] == 16
    # the fine-tuned model's test predictions were shared: each process predicted half, in order
    assert json.loads((out / "ft" / "manifest.json").read_text())["finetune"]["test_examples_per_process"] == [8, 8]
    assert set(json.loads((out / "results.json").read_text())) == {"ft", "zs"}
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no partial or temporary file left behind
