"""Causal-LM fine-tuning on a tiny Llama built from a config: generation SFT (loss masked to the
answer) and multiple choice scored like a prompted run; export, merge check and seeds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.finetune import (  # noqa: F401  (autouse fixture)
    FAST,
    PRECISION,
    job_from_spec,
    killed_after_first_checkpoint,
    one_thread,
    run_on_two_processes,
)
from helpers.tiny import build_tiny_model
from taskfit.errors import TaskfitError
from taskfit.evaluation.text_metrics import exact_match
from taskfit.finetuning import FinetuneJob, causal, common
from taskfit.models.base import Request

WORDS = "fox dog food cold lazy quick brown great".split()
COLOUR = dict(zip(WORDS, ["red", "green", "blue", "red", "green", "blue", "red", "green"]))
SETTINGS = {
    "full": {**FAST, "method": "full", "learning_rate": 0.003, "epochs": 20},
    "lora": {**FAST, "method": "lora", "learning_rate": 0.02, "r": 8, "epochs": 20},
}
GEN_TEMPLATE = "Word: {{ word }}\nCopy: {{ answer }}"


def _generation_rows(split: str, n: int) -> list[dict]:
    return [{"id": f"{split}{i}", "word": WORDS[i % 8], "copy": WORDS[i % 8]} for i in range(n)]


def _mc_rows(split: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        word = WORDS[i % 8]
        choices = ["red", "green", "blue"]
        rng.shuffle(choices)
        rows.append({"id": f"{split}{i}", "question": f"colour of {word}?", "choices": choices, "answer": COLOUR[word]})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("causal")
    rng = random.Random(0)
    _write(root / "gen-train.jsonl", _generation_rows("train", 48))
    _write(root / "gen-test.jsonl", _generation_rows("test", 8))
    _write(root / "mc-train.jsonl", _mc_rows("train", 48, rng))
    _write(root / "mc-test.jsonl", _mc_rows("test", 16, rng))
    build_tiny_model(root / "decoder")
    return root


def make_job(
    root: Path, folder: str, kind: str, train: str | None = None, test: str | None = None, **finetune
) -> FinetuneJob:
    prefix = "gen" if kind == "generation" else "mc"
    task = {"type": kind, "data": {"train": train or f"{prefix}-train.jsonl", "test": test or f"{prefix}-test.jsonl"}}
    if kind == "generation":
        task.update(label="copy", input=["word"])
        finetune.setdefault("template", GEN_TEMPLATE)
    else:
        task.update(label="answer", choices="choices")
    return job_from_spec(root, folder, {**task, "dev_fraction": 0.25}, finetune, root / "decoder")


RECIPES = {"generation": causal.generation, "multiple_choice": causal.multiple_choice}


@pytest.fixture(scope="module")
def results(root):
    cache = {}

    def get(kind: str, method: str):
        if (kind, method) not in cache:
            cache[kind, method] = RECIPES[kind](make_job(root, f"{kind}-{method}", kind, **SETTINGS[method]))
        return cache[kind, method]

    return get


def _exact(rows: list[dict]) -> float:
    scores = exact_match([r["prediction"] for r in rows], [r["references"] for r in rows])
    return sum(scores) / len(scores)


def test_untrained_model_does_not_copy(root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = make_job(root, "untrained", "generation", **SETTINGS["lora"])
    tokenizer = AutoTokenizer.from_pretrained(root / "decoder")
    model = AutoModelForCausalLM.from_pretrained(root / "decoder")
    rows, shares = causal._generate(job, causal.Prompter(job, tokenizer), model, tokenizer, 256, 8)
    assert _exact(rows) <= 0.25 and shares == [len(rows)]  # one process predicted all


@pytest.mark.parametrize("method", ["full", "lora"])
def test_generation_sft_learns_to_copy(results, method):
    result = results("generation", method)
    assert _exact(result.rows) >= 0.75
    assert [r["id"] for r in result.rows] == [f"test{i}" for i in range(8)]
    for row in result.rows:
        assert set(row) == {"id", "label", "references", "prediction", "correct", "generations", "prompt"}
        assert row["correct"] == (_exact([row]) == 1.0)  # what paired tests and the report read
        assert row["prompt"].startswith("Word: ") and row["prompt"].endswith("Copy: ")
        assert row["references"] == [row["label"]]
    info = result.info
    assert info["train_examples"] == 36 and info["dev_examples"] == 12
    assert info["best_dev_token_accuracy"] > 0.5 and info["masked_example"].startswith("[Word: ")
    if method == "lora":
        assert 0 <= info["merge_max_abs_diff"] < common.MERGE_TOLERANCE
        assert info["trainable_parameters"] < info["total_parameters"] / 4


def test_labels_mask_exactly_the_prompt(root):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "decoder")
    job = make_job(root, "masking", "generation", **SETTINGS["lora"])
    prompter = causal.Prompter(job, tokenizer)
    pairs = [prompter.pair(ex) for ex in job.task.split("train")[:4]]
    features, cut = causal.encode_all(tokenizer, pairs, 256, eos=True, joint=False)
    assert cut == 0
    for pair, feature in zip(pairs, features):
        labels, ids = feature["labels"], feature["input_ids"]
        n = labels.count(-100)
        assert labels[:n] == [-100] * n and -100 not in labels[n:]
        assert labels[n:] == ids[n:]
        assert tokenizer.decode(ids[:n]) == pair.prompt.rstrip(" ")
        assert tokenizer.decode(ids[n:]) == " " + pair.answer + tokenizer.eos_token  # the prompt's space moved
    shown = causal.masked_example(tokenizer, features[0])
    assert shown == f"[Word: fox\nCopy:] fox{tokenizer.eos_token}"


def test_chat_wraps_the_prompt_as_a_user_turn(root):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "decoder")
    job = make_job(root, "chat", "generation", **SETTINGS["lora"], chat=True)
    pair = causal.Prompter(job, tokenizer).pair(job.task.split("train")[0])
    assert pair.prompt == "<|im_start|>user\nWord: fox\nCopy:<|im_end|>\n<|im_start|>assistant\n"
    assert pair.answer == "fox"


def test_exported_generation_model_reloads(results):
    from transformers import AutoModelForCausalLM

    folder = Path(results("generation", "lora").info["model_folder"])
    assert not (folder / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "llama"
    assert not (folder.parent / "checkpoints").exists()


def test_multiple_choice_learns_and_scores_like_the_prompting_scorer(results):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taskfit.models.hf import HFLM

    result = results("multiple_choice", "lora")
    assert sum(r["correct"] for r in result.rows) / len(result.rows) >= 0.85
    row = result.rows[0]
    assert set(row) == {"id", "label", "prediction", "correct", "scores", "probabilities", "prompt"}
    assert row["prompt"] == "Question: colour of fox?\nAnswer: "
    folder = Path(result.info["model_folder"])
    lm = HFLM(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), {})
    job_options = [json.loads(line)["choices"] for line in (folder.parent.parent / "mc-test.jsonl").open()]
    for r, options in zip(result.rows, job_options):
        scores = lm.loglikelihood([Request(r["prompt"], o) for o in options])
        assert scores == pytest.approx(r["scores"], abs=1e-4)


def test_same_seed_gives_identical_rows(root, results):
    again = causal.generation(make_job(root, "generation-lora-again", "generation", **SETTINGS["lora"]))
    first = results("generation", "lora")
    assert again.rows == first.rows
    assert again.info["evaluations"] == first.info["evaluations"]


def test_default_templates(root):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "decoder")
    job = make_job(root, "default-gen", "generation", **SETTINGS["lora"], template=None)
    assert causal.Prompter(job, tokenizer).pair(job.task.split("train")[1]) == causal.Pair("dog\n", "dog")
    job = make_job(root, "default-mc", "multiple_choice", **SETTINGS["lora"])
    pair = causal.Prompter(job, tokenizer).pair(job.task.split("train")[1])
    assert pair == causal.Pair("Question: colour of dog?\nAnswer: ", "green")


def test_killed_run_resumes_to_the_same_rows(root, results):
    with killed_after_first_checkpoint():
        causal.multiple_choice(make_job(root, "mc-killed", "multiple_choice", **SETTINGS["lora"]))
    resumed = causal.multiple_choice(make_job(root, "mc-killed", "multiple_choice", **SETTINGS["lora"]))
    uninterrupted = results("multiple_choice", "lora")
    assert resumed.info["resumed_from_step"] == 5  # 36 examples / 8 per batch: 5 steps an epoch, evaluated each
    assert resumed.info["evaluations"] == uninterrupted.info["evaluations"]
    assert resumed.rows == uninterrupted.rows


def test_packed_training_matches_padded_training(root):
    """Packing changes the batch layout, not what each token sees: same dev figures, predictions
    and weights as padded batches (float32; no dropout, whose random masks follow the layout)."""
    settings = {**SETTINGS["lora"], "dropout": 0.0, "epochs": 8}
    packed = causal.generation(make_job(root, "generation-packed", "generation", **settings, packing=True))
    padded = causal.generation(make_job(root, "generation-padded", "generation", **settings))
    assert packed.info["packing"] is True and packed.info["packing_check_max_abs_diff"] < 1e-4
    assert padded.info["packing"] is False
    # (eval losses differ: the Trainer weights each eval batch's mean loss by its row count)
    accuracy = [e["token_accuracy"] for e in packed.info["evaluations"]]
    assert accuracy == pytest.approx([e["token_accuracy"] for e in padded.info["evaluations"]], abs=1e-6)
    assert [r["prediction"] for r in packed.rows] == [r["prediction"] for r in padded.rows]
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([list(range(3, 40))])
    a, b = (AutoModelForCausalLM.from_pretrained(r.info["model_folder"]) for r in (packed, padded))
    assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-3)


def test_packing_check_catches_attention_across_examples(root):
    """A model that drops the restarting position ids lets packed examples attend to each other:
    the check sees it and the run trains unpacked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "decoder")
    model = AutoModelForCausalLM.from_pretrained(root / "decoder")
    job = make_job(root, "packing-check", "generation", **SETTINGS["lora"])
    pairs = [causal.Prompter(job, tokenizer).pair(ex) for ex in job.task.split("train")[:4]]
    features, _ = causal.encode_all(tokenizer, pairs, 256, eos=True, joint=False)
    assert causal.packing_leaks(model, tokenizer, features)[0] < 1e-4

    class IgnoresPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, use_cache=use_cache)  # one long causal sequence

    assert causal.packing_leaks(IgnoresPositions(model), tokenizer, features)[0] > 0.01


def test_answer_metrics_count_each_packed_answer():
    """Exact match per answer, whether answers sit in their own rows or share a packed row."""
    from types import SimpleNamespace

    x = -100
    labels = np.array([[x, x, 5, 6, x, x, 7, x, 8, 9]])  # three answers: [5 6], [7], [8 9]
    hits = np.array([[0, 1, 1, 0, 0, 0, 0, 1, 1]])  # position t predicts label t + 1
    out = causal.answer_metrics(SimpleNamespace(predictions=hits, label_ids=labels))
    assert out["exact_match"] == pytest.approx(2 / 3)  # [5 6] right, [7] wrong, [8 9] right
    assert out["token_accuracy"] == pytest.approx(4 / 5)


def test_dev_counts_each_example_with_its_best_reference():
    """Answers 0 and 1 are two references of one example, answer 2 another example's only one."""
    from types import SimpleNamespace

    x = -100
    labels = np.array([[x, x, 5, 6, x, x, 7, 8, x, 9, 4]])  # [5 6], [7 8], [9 4]
    hits = np.array([[0, 0, 0, 0, 0, 1, 1, 0, 1, 0]])  # [5 6] 0 of 2, [7 8] 2 of 2, [9 4] 1 of 2
    pred = SimpleNamespace(predictions=hits, label_ids=labels)
    out = causal.best_reference_metrics([0, 0, 1])(pred)
    assert out["token_accuracy"] == pytest.approx(3 / 4)  # [7 8] for the first example, [9 4]
    assert out["exact_match"] == pytest.approx(1 / 2)
    alone = causal.answer_metrics(pred)  # every answer its own example
    assert alone["token_accuracy"] == pytest.approx(3 / 6) and alone["exact_match"] == pytest.approx(1 / 3)
    with pytest.raises(RuntimeError, match="3 answers in the eval pass, 2 expected"):
        causal.best_reference_metrics([0, 1])(pred)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_answer_only_loss_and_gradients_equal_the_models_own(root, packed, lora):
    """The head run on labelled positions only gives the loss and gradients of the model's own
    forward (which runs it everywhere), padded or packed, plain or with a LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taskfit.finetuning import training

    tokenizer = AutoTokenizer.from_pretrained(root / "decoder")
    model = AutoModelForCausalLM.from_pretrained(root / "decoder")
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    job = make_job(root, "answer-loss", "generation", **SETTINGS["lora"])
    pairs = [causal.Prompter(job, tokenizer).pair(ex) for ex in job.task.split("train")[:6]]
    features, _ = causal.encode_all(tokenizer, pairs, 256, eos=True, joint=False)
    batch = (causal.packing_collator() if packed else causal.padding_collator(tokenizer))(features)
    count = int((batch["labels"][:, 1:] != -100).sum())
    model.train()

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    own, own_grads = loss_and_grads(lambda: model(**batch, num_items_in_batch=count).loss)
    ours, our_grads = loss_and_grads(lambda: training.answer_loss(model, batch, count))
    assert ours == pytest.approx(own, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(our_grads, own_grads))


def test_training_steps_use_the_answer_only_loss(root, monkeypatch):
    from taskfit.finetuning import training

    calls = []
    original = training.answer_loss
    monkeypatch.setattr(training, "answer_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = causal.generation(make_job(root, "answer-only-steps", "generation", **{**SETTINGS["lora"], "epochs": 1}))
    assert len(calls) == result.info["steps"] > 0


@pytest.mark.parametrize("packing", [False, True])
def test_generation_trains_on_every_reference(root, packing):
    """An example with two acceptable references gives two training pairs, and two dev pairs
    (packed or not, the eval pass gives the dev metric every answer, in order)."""
    from transformers import AutoTokenizer

    rows = [{"id": f"r{i}", "word": WORDS[i % 8], "copy": [WORDS[i % 8], WORDS[i % 8].upper()]} for i in range(24)]
    _write(root / "gen-train-refs.jsonl", rows)
    settings = {**SETTINGS["lora"], "epochs": 1, "packing": packing}
    job = make_job(root, f"generation-refs-{packing}", "generation", train="gen-train-refs.jsonl", **settings)
    example = job.task.split("train")[0]
    pairs = causal.Prompter(job, AutoTokenizer.from_pretrained(root / "decoder")).pairs(example)
    assert [p.answer for p in pairs] == ["fox", "FOX"] and pairs[0].prompt == pairs[1].prompt
    result = causal.generation(job)
    assert result.info["train_pairs"] == 2 * result.info["train_examples"] > 0
    assert result.info["dev_pairs"] == 2 * result.info["dev_examples"] > 0
    assert result.info["packing"] is packing
    assert all(0 <= e["token_accuracy"] <= 1 for e in result.info["evaluations"])


def test_packed_generation_under_two_processes_scores_every_dev_answer_once(root, tmp_path):
    """torchrun, 2 CPU processes, packing, two references per example: the dev metric gets every
    dev answer once and in order (packed eval batches padded across processes did not)."""
    rows = [{"id": f"r{i}", "word": WORDS[i % 8], "copy": [WORDS[i % 8], WORDS[i % 8].upper()]} for i in range(27)]
    _write(tmp_path / "train.jsonl", rows)
    finetune = {**SETTINGS["lora"], "epochs": 2, "batch_size": 3, "packing": True, "template": GEN_TEMPLATE}
    spec = {
        "name": "mp",
        "task": {
            "type": "generation",
            "label": "copy",
            "input": ["word"],
            "data": {"train": "train.jsonl", "test": str(root / "gen-test.jsonl")},
            "dev_fraction": 0.25,
        },
        "models": [{"name": str(root / "decoder"), "dtype": "float32"}],
        "runs": {"ft": {"finetune": finetune}},
    }
    run_on_two_processes(tmp_path, spec)
    info = json.loads((tmp_path / "out" / "ft" / "manifest.json").read_text())["finetune"]
    assert info["packing"] is True and info["dev_pairs"] == 2 * info["dev_examples"] == 14
    # the test split's greedy predictions were shared by the processes and came back in order
    test = [json.loads(line) for line in (root / "gen-test.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "out" / "ft" / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [ex["id"] for ex in test]
    shares = info["test_examples_per_process"]
    assert len(shares) == 2 and sum(shares) == len(test) and min(shares) == len(test) // 2
    assert info["evaluations"] and all(0 <= e["token_accuracy"] <= 1 for e in info["evaluations"])


def test_multi_line_answers_are_generated_whole(root):
    """The template's text after the answer starts with a newline: the model learns answer + that
    text + EOS, and the prediction is the whole answer (a newline stop cut it to its first line)."""
    for split, n in (("train", 48), ("test", 8)):
        rows = [{"id": f"{split}{i}", "word": w, "copy": f"{w}\n{w}"} for i, w in enumerate(WORDS * 6) if i < n]
        _write(root / f"gen-{split}-lines.jsonl", rows)
    settings = {**SETTINGS["lora"], "template": GEN_TEMPLATE + "\n"}
    job = make_job(root, "generation-lines", "generation", "gen-train-lines.jsonl", "gen-test-lines.jsonl", **settings)
    result = causal.generation(job)
    assert sum("\n" in r["prediction"] for r in result.rows) >= 6
    assert _exact(result.rows) >= 0.75


def test_the_answer_ends_where_the_templates_text_after_it_begins():
    assert causal.answer_of(" blue\nblue\n", "\n") == "blue\nblue"
    assert causal.answer_of(" blue END more", " END") == "blue"
    assert causal.answer_of(" blue", " END") == "blue"


def test_a_max_length_without_room_for_prompt_and_answer_is_refused_before_training(root, monkeypatch):
    """Generation needs the longest answer (+ a margin) and a prompt within max_length: refused
    before training, naming finetune.max_length (it used to fail after training, naming a
    prompt setting the run does not have)."""
    trained = []
    monkeypatch.setattr(causal, "_train", lambda *a, **k: trained.append(a))
    job = make_job(root, "generation-short", "generation", **{**SETTINGS["lora"], "max_length": 12})
    with pytest.raises(
        TaskfitError, match=r"runs.ft.finetune.max_length: 12 tokens cannot hold a prompt and an answer"
    ):
        causal.generation(job)
    assert trained == []


def test_lora_on_embeddings_tied_to_the_output_layer_is_refused_before_training(root, monkeypatch):
    """The tiny decoder ties its input embeddings to its LM head: a merged LoRA update of
    `embed_tokens` would change the head too, which the merge check refused only after training."""
    trained = []
    monkeypatch.setattr(causal, "_train", lambda *a, **k: trained.append(a))
    job = make_job(root, "generation-tied", "generation", **{**SETTINGS["lora"], "target_modules": ["embed_tokens"]})
    with pytest.raises(
        TaskfitError, match=r"runs.ft.finetune.*embed_tokens.*tied.*output layer.*target_modules"
    ) as err:
        causal.generation(job)
    assert trained == []
    assert "q_proj" in str(err.value).split("layers:")[1] and "embed_tokens" not in str(err.value).split("layers:")[1]
