"""Token-classification and multiple-choice fine-tuning on tiny models built from configs:
learning toy tasks (full and LoRA), sub-token alignment, export and reload, seeds, and the
decoder-LM refusal of the multiple-choice recipe."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from helpers.finetune import PRECISION, SETTINGS, job_from_spec, killed_after_first_checkpoint, one_thread  # noqa: F401  (autouse fixture)
from helpers.tiny import build_tiny_model
from helpers.tiny_encoder import build_tiny_encoder
from taskfit.errors import TaskfitError
from taskfit.finetuning import FinetuneJob, common
from taskfit.finetuning.multiple_choice import ChoiceCollator, is_encoder, multiple_choice
from taskfit.finetuning.token_classification import align_labels, encode_words, in_scheme, token_classification

CITIES = "Paris Berlin Madrid Rome".split()
NOUNS = "food service room staff movie book film show meal trip day hotel place".split()
ADJECTIVES = "good bad great terrible fine okay nice awful".split()


def _sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    """`the <noun> in <City> was <adjective>`, the city (B-LOC) sometimes first or left out."""
    words = ["the", rng.choice(NOUNS), "in", rng.choice(CITIES), "was", rng.choice(ADJECTIVES)]
    shape = rng.randrange(3)
    if shape == 1:
        words = [words[3], "was", rng.choice(ADJECTIVES)]
    elif shape == 2:
        words = ["the", rng.choice(NOUNS), "was", rng.choice(ADJECTIVES)]
    return words, ["B-LOC" if w in CITIES else "O" for w in words]


def _choice_row(i: int, split: str, rng: random.Random) -> dict:
    """The correct option is the noun the question mentions; the other, a different noun."""
    noun, other = rng.sample(NOUNS[:4], 2)  # few nouns: a tiny model learns the match in a few epochs
    options = [noun, other] if rng.random() < 0.5 else [other, noun]
    question = f"the {noun} was {rng.choice(ADJECTIVES)}"
    return {"id": f"{split}{i}", "question": question, "options": options, "label": options.index(noun)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune-token-mc")
    rng, mc_rng = random.Random(0), random.Random(1)
    for split, n in (("train", 64), ("test", 16)):
        rows = []
        for i in range(n):
            tokens, tags = _sentence(rng)
            rows.append({"id": f"{split}{i}", "tokens": tokens, "tags": tags})
        (root / f"ner-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        rows = [_choice_row(i, split, mc_rng) for i in range(4 * n if split == "train" else n)]  # matching needs more
        (root / f"mc-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_tiny_encoder(root / "encoder")
    build_tiny_model(root / "decoder")
    return root


def make_job(root: Path, kind: str, folder: str, model: str = "encoder", **finetune) -> FinetuneJob:
    if kind == "ner":
        task = {"type": "token_classification", "tokens": "tokens", "label": "tags"}
    else:
        task = {"type": "multiple_choice", "choices": "options"}
    task |= {"data": {"train": f"{kind}-train.jsonl", "test": f"{kind}-test.jsonl"}, "dev_fraction": 0.25}
    return job_from_spec(root, folder, task, finetune, root / model)


RECIPES = {"ner": token_classification, "mc": multiple_choice}


@pytest.fixture(scope="module")
def results(root):
    """Each (task, model, method) trained once, on demand, shared by the tests below."""
    cache = {}

    def get(kind: str, model: str, method: str):
        if (kind, model, method) not in cache:
            job = make_job(root, kind, f"{kind}-{model}-{method}", model, **SETTINGS[method])
            cache[kind, model, method] = RECIPES[kind](job)
        return cache[kind, model, method]

    return get


@pytest.mark.parametrize(
    ("model", "method"), [("encoder", "full"), ("encoder", "lora"), ("decoder", "full"), ("decoder", "lora")]
)
def test_token_classification_learns_and_rows_are_well_formed(root, results, model, method):
    result = results("ner", model, method)
    assert sum(r["correct"] for r in result.rows) / len(result.rows) >= 0.85
    assert [r["id"] for r in result.rows] == [f"test{i}" for i in range(16)]
    for row in result.rows:
        assert set(row) == {"id", "tokens", "label", "prediction", "correct", "prompt"}
        assert len(row["prediction"]) == len(row["tokens"]) == len(row["label"])
        assert set(row["prediction"]) <= {"O", "B-LOC"}
        assert row["correct"] == (row["label"] == row["prediction"])
        assert row["prompt"] == " ".join(row["tokens"])
    info = result.info
    assert info["best_dev_entity_f1"] >= 0.75 and info["tag_scheme"] == "bio"  # 16 dev sentences: coarse
    assert info["truncated_inputs"] == 0 and info["truncated_test_words"] == 0
    assert info["train_examples"] + info["dev_examples"] == 64
    if method == "lora":
        assert info["trainable_parameters"] < info["total_parameters"] / 2
        assert 0 <= info["merge_max_abs_diff"] < common.MERGE_TOLERANCE
    assert not (root / f"ner-{model}-{method}" / "checkpoints").exists()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_multiple_choice_learns_on_an_encoder(root, results, method):
    result = results("mc", "encoder", method)
    assert sum(r["correct"] for r in result.rows) / len(result.rows) >= 0.85
    for row in result.rows:
        assert set(row) == {"id", "label", "prediction", "correct", "scores", "probabilities", "prompt"}
        assert row["label"] in (0, 1) and row["prediction"] == max(range(2), key=row["scores"].__getitem__)
        assert row["correct"] == (row["label"] == row["prediction"])
        assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-6)
        assert row["prompt"].startswith("the ")  # the question alone: options, label and id are not context
    assert result.info["best_dev_accuracy"] >= 0.8 and result.info["train_examples"] == 192


def test_token_classification_export_reloads_with_the_same_predictions(root, results):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    result = results("ner", "decoder", "lora")
    folder = Path(result.info["model_folder"])
    assert not (folder / "adapter_config.json").exists()
    model, tokenizer = (
        AutoModelForTokenClassification.from_pretrained(folder).eval(),
        AutoTokenizer.from_pretrained(folder),
    )
    for row in result.rows[:6]:  # the words as running text, each token back to its word by offsets
        [(feature, word_ids)] = encode_words(tokenizer, [row["tokens"]], 512)
        with torch.no_grad():
            predicted = model(**{k: torch.tensor([v]) for k, v in feature.items()}).logits[0].argmax(-1).tolist()
        first = {}
        for position, word in enumerate(word_ids):
            if word is not None:
                first.setdefault(word, position)
        tags = [model.config.id2label[predicted[first[w]]] for w in range(len(row["tokens"]))]
        assert in_scheme(tags, "bio") == row["prediction"]


def test_multiple_choice_export_reloads_with_the_same_scores(root, results):
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    result = results("mc", "encoder", "lora")
    folder = Path(result.info["model_folder"])
    model, tokenizer = AutoModelForMultipleChoice.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    job = make_job(root, "mc", "unused")
    for row, ex in list(zip(result.rows, job.test))[:6]:
        encoded = tokenizer([row["prompt"]] * 2, list(ex.options), return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**{k: v.unsqueeze(0) for k, v in encoded.items()}).logits[0]
        assert logits.tolist() == pytest.approx(row["scores"], abs=1e-5)


def test_a_word_split_into_sub_tokens_gets_its_label_once(root):
    from transformers import AutoTokenizer

    for model, word in (("encoder", "good!"), ("decoder", "Madrid")):
        tokenizer = AutoTokenizer.from_pretrained(root / model)
        [(feature, word_ids)] = encode_words(tokenizer, [["the", word, "was"]], 64)
        assert word_ids.count(1) >= 2  # the word is split into several sub-tokens
        labels = align_labels(word_ids, [0, 1, 0])
        assert labels.count(1) == 1 and labels[word_ids.index(1)] == 1  # on the first sub-token only
        assert [lab for lab, w in zip(labels, word_ids) if w is None] == [-100] * word_ids.count(None)
        assert sum(lab != -100 for lab in labels) == 3
    [(_, word_ids)] = encode_words(AutoTokenizer.from_pretrained(root / "encoder"), [["good"] * 10], 6)
    assert len(set(w for w in word_ids if w is not None)) == 4  # [CLS] + 4 words + [SEP]: 6 words cut


def test_same_seed_gives_identical_rows(root, results):
    again = token_classification(make_job(root, "ner", "ner-again", **SETTINGS["lora"]))
    first = results("ner", "encoder", "lora")
    assert again.rows == first.rows and again.info["evaluations"] == first.info["evaluations"]


def test_multiple_choice_refuses_a_decoder_lm(root):
    assert is_encoder(str(root / "encoder")) and not is_encoder(str(root / "decoder"))
    with pytest.raises(TaskfitError, match="runs.ft.finetune: .*decoder.*causal LM"):
        multiple_choice(make_job(root, "mc", "mc-decoder", "decoder", **SETTINGS["lora"]))


def test_choice_collator_pads_options_and_lengths(root):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "encoder")
    features = [
        {k: v for k, v in tokenizer(["the food", "the food"], ["good", "very bad"]).items()} | {"labels": 1},
        {k: v for k, v in tokenizer(["a day"] * 3, ["fine", "nice", "okay"]).items()} | {"labels": 2},
    ]
    batch = ChoiceCollator(tokenizer)(features)
    assert batch["input_ids"].shape[:2] == (2, 3) and batch["labels"].tolist() == [1, 2]
    assert batch["attention_mask"][0, 1].sum() == len(features[0]["input_ids"][1])


def test_killed_token_classification_run_resumes_to_the_same_result(root, results):
    with killed_after_first_checkpoint():
        token_classification(make_job(root, "ner", "ner-killed", **SETTINGS["lora"]))
    resumed = token_classification(make_job(root, "ner", "ner-killed", **SETTINGS["lora"]))
    uninterrupted = results("ner", "encoder", "lora")
    assert resumed.info["resumed_from_step"] == 6
    assert resumed.info["evaluations"] == uninterrupted.info["evaluations"]
    assert resumed.rows == uninterrupted.rows


def test_filler_options_take_no_part_in_the_loss_or_the_dev_argmax(root):
    """An example with 2 options batched with one of 3: its filler option gets the lowest logit,
    so the loss is the mean cross-entropy over each example's own options."""
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    from taskfit.finetuning.multiple_choice import ChoiceTrainer

    tokenizer = AutoTokenizer.from_pretrained(root / "encoder")
    model = AutoModelForMultipleChoice.from_pretrained(root / "encoder")
    features = [
        {k: v for k, v in tokenizer(["the food"] * 2, ["good", "very bad"]).items()} | {"labels": 1},
        {k: v for k, v in tokenizer(["a day"] * 3, ["fine", "nice", "okay"]).items()} | {"labels": 2},
    ]
    batch = ChoiceCollator(tokenizer, mark_fillers=True)(features)
    assert batch["choice_mask"].tolist() == [[True, True, False], [True, True, True]]
    loss, outputs = ChoiceTrainer.compute_loss(None, model, batch, return_outputs=True)  # uses no Trainer state
    plain = model(**{k: v for k, v in ChoiceCollator(tokenizer)(features).items() if k != "labels"}).logits
    own = [torch.nn.functional.cross_entropy(plain[i, :n][None], torch.tensor([g])) for i, (n, g) in
           enumerate([(2, 1), (3, 2)])]  # fmt: skip
    assert loss.item() == pytest.approx(torch.stack(own).mean().item(), rel=1e-5)
    accumulated = ChoiceTrainer.compute_loss(None, model, batch, num_items_in_batch=4)  # 2 of 4 examples
    assert accumulated.item() == pytest.approx(torch.stack(own).sum().item() / 4, rel=1e-5)
    assert outputs.logits[0, 2] == torch.finfo(outputs.logits.dtype).min
    assert torch.equal(outputs.logits[1], plain[1]) and torch.equal(outputs.logits[0, :2], plain[0, :2])


def test_words_are_tokenized_as_running_text(root):
    """A byte-level BPE tokenizer sees the words as the sentence it was trained on ("Ġfox" after
    a space, not f-o-x), and every token maps back to the word it ends in."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "decoder")  # byte-level BPE, like GPT-2 or SmolLM
    words = ["The", "quick", "brown", "fox", "jumps", "Madrid", "!"]
    [(feature, word_ids)] = encode_words(tokenizer, [words], 64)
    assert feature["input_ids"] == tokenizer(" ".join(words))["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert tokens[word_ids.index(3)] == "Ġfox"
    spelled = {}
    for token, word in zip(tokens, word_ids):
        if word is not None:
            spelled[word] = spelled.get(word, "") + tokenizer.convert_tokens_to_string([token])
    assert [spelled[i].strip() for i in range(len(words))] == words
