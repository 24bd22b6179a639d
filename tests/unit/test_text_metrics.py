"""Text-generation metrics: hand-computed EM/F1/ROUGE-L, and BLEU/chrF against sacrebleu itself."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from taskfit.evaluation.text_metrics import (
    bleu,
    chrf,
    exact_match,
    generation_metrics,
    normalize_answer,
    rouge_l,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple,  a pear and THE plum. ", "apple pear and plum"),
        ("Theatre another", "theatre another"),  # articles only as whole words
        ("e-mail", "email"),  # SQuAD deletes punctuation rather than splitting on it
        ("«Bonjour», dit-il…", "bonjour ditil"),  # unicode punctuation, not in string.punctuation
        ("¿Qué tal?", "qué tal"),
        ("Café!", "café"),  # accents are kept, as in SQuAD
        ("Cafe\u0301", "café"),  # decomposed é equals the precomposed one (NFC)
        ("$5 + 3", "5 3"),  # the ASCII symbols SQuAD strips
        ("東京、日本。", "東京日本"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_after_normalization():
    preds = ["The cat.", "Café!", "a dog", "Paris", ""]
    refs = ["cat", "cafe", "the DOG", "London", ""]
    assert exact_match(preds, refs) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert exact_match(["Café!"], ["CAFÉ"]) == [1.0]


def test_token_f1_by_hand():
    # pred tokens: [big, red, dog] ; ref tokens: [red, dog, barked] -> 2 common
    # precision 2/3, recall 2/3, F1 2/3
    assert token_f1(["The big red dog"], ["red dog barked."]) == pytest.approx([2 / 3])
    # multiset overlap: pred [dog, dog, dog], ref [dog, cat] -> 1 common; P 1/3, R 1/2, F1 0.4
    assert token_f1(["dog dog dog"], ["dog cat"]) == pytest.approx([0.4])
    assert token_f1(["fish"], ["dog"]) == [0.0]


def test_token_f1_empty_cases():
    assert token_f1(["", "the"], ["", "a"]) == [1.0, 1.0]  # both normalize to nothing
    assert token_f1(["", "dog"], ["dog", "!!"]) == [0.0, 0.0]


def test_multiple_references_take_the_best():
    preds = ["red dog", "blue sky"]
    refs = [["a cat", "red dog"], ["the sea", "blue skies above"]]
    assert exact_match(preds, refs) == [1.0, 0.0]
    # second: vs "blue skies above": 1 common, P 1/2, R 1/3 -> F1 0.4
    assert token_f1(preds, refs) == pytest.approx([1.0, 0.4])
    assert rouge_l(preds, refs) == pytest.approx([1.0, 0.4])


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_matches_hand_lcs():
    pred, ref = "police killed the gunman", "the gunman was shot by police"
    # by hand: LCS is "the gunman" (length 2); P = 2/4, R = 2/6, F = 2PR/(P+R) = 0.4
    assert _lcs(pred.split(), ref.split()) == 2
    assert rouge_l([pred], [ref]) == pytest.approx([0.4])
    pred, ref = "a b c d e f", "a x c y e z f"
    lcs = _lcs(pred.split(), ref.split())  # a c e f
    p, r = lcs / 6, lcs / 7
    assert rouge_l([pred], [ref]) == pytest.approx([2 * p * r / (p + r)])


def test_rouge_l_equals_rouge_score_default_on_ascii():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    preds = ["The quick brown fox, it jumps!", "Hello there", "A B C-D"]
    refs = ["the fox jumps over the lazy dog", "General Kenobi", "c d a b"]
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    assert rouge_l(preds, refs) == pytest.approx(expected)


def test_rouge_l_keeps_non_ascii_words():
    # rouge-score's default tokenizer drops every non-[a-z0-9] character, scoring these 0
    assert rouge_l(["Привет мир"], ["привет, мир!"]) == [1.0]
    assert rouge_l(["café noir"], ["cafe noir"]) == pytest.approx([0.5])
    assert rouge_l(["!!!"], ["..."]) == [0.0]  # no tokens on either side: 0, as rouge-score


PREDS = ["The cat sat on the mat.", "There is a dog in the garden", "I like green tea very much"]
REFS = ["The cat is sitting on the mat.", "A dog is in the garden", "I really like green tea"]


def test_bleu_and_chrf_equal_sacrebleu_divided_by_100():
    assert bleu(PREDS, REFS) == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score / 100)
    assert chrf(PREDS, REFS) == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score / 100)
    assert 0 < bleu(PREDS, REFS) < 1 and 0 < chrf(PREDS, REFS) < 1
    assert bleu(REFS, REFS) == 1.0 and chrf(REFS, REFS) == 1.0  # never above 1 (sacrebleu: 100.00000000000004)


def test_bleu_and_chrf_with_several_references():
    refs = [[REFS[0], "A cat sat on the mat."], [REFS[1]], [REFS[2], "I like green tea a lot", "Green tea: yes"]]
    streams = [
        [REFS[0], REFS[1], REFS[2]],
        ["A cat sat on the mat.", None, "I like green tea a lot"],
        [None, None, "Green tea: yes"],
    ]
    assert bleu(PREDS, refs) == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score / 100)
    assert chrf(PREDS, refs) == pytest.approx(sacrebleu.corpus_chrf(PREDS, streams).score / 100)
    assert bleu(PREDS, refs) > bleu(PREDS, REFS)  # an extra reference can only add matches


def test_bleu_tokenizer_is_passed_on():
    preds, refs = ["我喜欢绿茶"], ["我很喜欢绿茶"]
    assert bleu(preds, refs, tokenize="zh") == pytest.approx(
        sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score / 100
    )


def test_generation_metrics_are_means_and_corpus_scores():
    out = generation_metrics(PREDS, REFS)
    assert set(out) == {"exact_match", "token_f1", "rouge_l", "bleu", "chrf"}
    assert out["token_f1"] == pytest.approx(np.mean(token_f1(PREDS, REFS)))
    assert out["rouge_l"] == pytest.approx(np.mean(rouge_l(PREDS, REFS)))
    assert out["exact_match"] == 0.0
    assert out["bleu"] == pytest.approx(bleu(PREDS, REFS))
    assert all(isinstance(v, float) for v in out.values())


def test_per_example_scores_feed_a_bootstrap():
    values = np.asarray(token_f1(PREDS, REFS))
    assert values.shape == (3,) and values.dtype == np.float64
    idx = np.random.default_rng(0).integers(0, 3, size=(50, 3))
    assert values[idx].mean(axis=1).shape == (50,)


def test_shape_and_type_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="not a string"):
        token_f1("abc", "abc")
    with pytest.raises(TypeError, match="example 0"):
        rouge_l(["a"], [[]])
    with pytest.raises(ValueError, match="no predictions"):
        generation_metrics([], [])
    assert exact_match([], []) == []


@pytest.mark.parametrize("name, corpus", [("bleu", bleu), ("chrf", chrf)])
def test_corpus_statistics_sum_to_the_corpus_score(name, corpus):
    """Summed per-example counts score exactly as the corpus does, and a subset's as that subset."""
    from taskfit.evaluation.text_metrics import corpus_statistics

    refs = [[REFS[0], "A cat sat on the mat."], [REFS[1]], [REFS[2], "Green tea: yes"]]
    stats, score = corpus_statistics(name, PREDS, refs)
    assert stats.shape[0] == 3
    assert score(stats.sum(axis=0)) == corpus(PREDS, refs)
    assert score(stats[[0, 2, 2]].sum(axis=0)) == corpus([PREDS[0], PREDS[2], PREDS[2]], [refs[0], refs[2], refs[2]])
    with pytest.raises(ValueError, match="bleu or chrf"):
        corpus_statistics("meteor", PREDS, refs)


def test_run_metrics_give_bleu_and_chrf_bootstrap_intervals():
    import random

    from taskfit.evaluation.rows import _generation_metrics

    rng = random.Random(0)
    words = "the cat sat on a mat dog ran fast slow red blue".split()
    refs = [[" ".join(rng.choices(words, k=rng.randint(2, 8)))] for _ in range(60)]
    preds = [r[0] if rng.random() < 0.4 else " ".join(rng.choices(words, k=4)) for r in refs]
    out = _generation_metrics(preds, refs, seed=0)
    for name, corpus in (("bleu", bleu), ("chrf", chrf)):
        low, high = out[f"{name}_ci95"]
        assert out[name] == corpus(preds, refs) and low < out[name] < high and high - low < 0.5
    assert out == _generation_metrics(preds, refs, seed=0)  # seeded
