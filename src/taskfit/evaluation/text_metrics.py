"""Metrics for generated text: exact match, token F1, ROUGE-L, BLEU and chrF.

Pure functions over a list of predictions and a list of references, one entry per example.
A reference is a string or a list of acceptable strings; with several, exact match, token F1
and ROUGE-L take the best reference per example, and BLEU and chrF pass them all to
sacrebleu (its multi-reference mode).

Exact match, token F1 and ROUGE-L return one score per example (a list of floats that
`np.asarray` turns into the per-example vector a bootstrap resamples). BLEU and chrF are
corpus-level (their n-gram counts are pooled before the ratio), so they return one number;
`corpus_statistics` gives the per-example counts that a bootstrap resamples for them.
Every score is on the 0-1 scale, sacrebleu's 0-100 scores included (divided by 100).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

Reference = str | Sequence[str]
"""One example's reference: a string, or the list of acceptable strings."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization, unicode-safe: NFC, lowercase, remove punctuation, drop
    the articles a/an/the, collapse whitespace.

    Punctuation is every character of a unicode `P*` category (so « » ¿ … “ ” 、 are removed,
    which SQuAD's `string.punctuation` misses) plus the ASCII symbols SQuAD removes ($ + < = >
    ^ ` | ~). Accents are kept, as in SQuAD: "Café!" normalizes to "café", not "cafe", since
    stripping them would merge distinct words in many languages (e.g. Spanish "sé"/"se").
    NFC makes a decomposed "é" (e + combining accent) equal to the precomposed one.
    """
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(ch for ch in text if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _is_punct(ch: str) -> bool:
    # Deleted, not replaced by a space, as SQuAD does: "e-mail" becomes "email".
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def is_exact(prediction: str, references: Reference) -> bool:
    """Whether a prediction is an exact match (after `normalize_answer`) of one of its references:
    the `correct` of a generation row, which paired tests and the report read."""
    return bool(exact_match([prediction], [references])[0])


def exact_match(preds: Sequence[str], refs: Sequence[Reference]) -> list[float]:
    """1.0 where the normalized prediction equals a normalized reference, else 0.0."""
    return [_best(pred, options, _em) for pred, options in _pairs(preds, refs)]


def token_f1(preds: Sequence[str], refs: Sequence[Reference]) -> list[float]:
    """SQuAD token-overlap F1 between the normalized texts' whitespace tokens (a multiset
    intersection). Both empty: 1.0; exactly one empty: 0.0."""
    return [_best(pred, options, _f1) for pred, options in _pairs(preds, refs)]


def _em(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def _f1(pred: str, ref: str) -> float:
    pred_tokens, ref_tokens = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


class _UnicodeRougeTokenizer:
    """rouge-score's default tokenizer (lowercase, split on anything that is not a letter or
    digit) made unicode-aware. The default keeps only [a-z0-9], so it turns "café" into "caf"
    and a Greek, Cyrillic or Chinese text into no tokens at all (ROUGE 0). On ASCII text the
    two give identical tokens, so English scores match the reference implementation."""

    _TOKEN = re.compile(r"[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(unicodedata.normalize("NFC", text).lower())


@cache
def _rouge_scorer():
    """rouge-score's ROUGE-L scorer, made at first use: importing rouge-score imports nltk, and
    with it scipy.stats and scikit-learn (~1 s), which a run that scores no text never needs.
    No stemming (use_stemmer=False): the Porter stemmer is English-only and would silently
    mangle other languages; scores are therefore those of `rouge-score` without `--stem`."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_UnicodeRougeTokenizer())


def rouge_l(preds: Sequence[str], refs: Sequence[Reference]) -> list[float]:
    """ROUGE-L F-measure (longest common subsequence of tokens) per example, from Google's
    `rouge-score`, best reference per example. As in `rouge-score`, a pair where either side
    has no tokens scores 0.0."""
    return [_best(pred, options, _rouge_l) for pred, options in _pairs(preds, refs)]


def _rouge_l(pred: str, ref: str) -> float:
    return float(_rouge_scorer().score(ref, pred)["rougeL"].fmeasure)  # score(target, prediction)


def bleu(preds: Sequence[str], refs: Sequence[Reference], *, tokenize: str = "13a") -> float:
    """Corpus BLEU from sacrebleu's `corpus_bleu` with its defaults (case-sensitive, raw
    text, 13a tokenizer, exp smoothing), divided by 100 to lie in 0-1. Pass
    `tokenize="zh"`, `"ja-mecab"` or `"flores200"` for text without spaces between words."""
    import sacrebleu  # imported here: it takes ~0.1 s, and most runs score no text

    hyps, streams = _sacrebleu_args(preds, refs)
    return _unit(sacrebleu.corpus_bleu(hyps, streams, tokenize=tokenize).score)


def chrf(preds: Sequence[str], refs: Sequence[Reference]) -> float:
    """Corpus chrF (character 6-grams, beta 2) from sacrebleu's `corpus_chrf` with its
    defaults, divided by 100 to lie in 0-1."""
    import sacrebleu

    hyps, streams = _sacrebleu_args(preds, refs)
    return _unit(sacrebleu.corpus_chrf(hyps, streams).score)


def corpus_statistics(name: str, preds: Sequence[str], refs: Sequence[Reference]) -> tuple[Any, Callable[[Any], float]]:
    """Per-example sufficient statistics of corpus `bleu` or `chrf`, a float array (N, k) (n-gram
    matches and totals, lengths), and the function that scores summed statistics (k,) on the
    0-1 scale. Corpus scores pool their counts over the examples, so the score of any resample
    of the examples is that of its examples' summed statistics: what the bootstrap and the
    paired tests resample, as sacrebleu's own `--confidence` and `--paired-bs` do. The score of
    all the examples is `bleu` / `chrf` (tested)."""
    import numpy as np
    from sacrebleu.metrics import BLEU, CHRF

    metric = BLEU() if name == "bleu" else CHRF() if name == "chrf" else None
    if metric is None:
        raise ValueError(f"corpus_statistics: no corpus metric '{name}' (bleu or chrf)")
    hyps, streams = _sacrebleu_args(preds, refs)
    # sacrebleu's own per-segment statistics and scoring (what its bootstrap uses; named private)
    stats = np.asarray(metric._extract_corpus_statistics(hyps, streams), dtype=float)

    def score(summed) -> float:
        return _unit(metric._compute_score_from_stats(summed).score)

    return stats, score


def _unit(score: float) -> float:
    """sacrebleu's 0-100 score on the 0-1 scale (a perfect BLEU computes as 100.00000000000004)."""
    return min(1.0, float(score) / 100)


def generation_metrics(preds: Sequence[str], refs: Sequence[Reference]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L over the examples, and corpus BLEU and chrF."""
    if not preds:
        raise ValueError("generation_metrics: no predictions to score")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {
        "exact_match": mean(exact_match(preds, refs)),
        "token_f1": mean(token_f1(preds, refs)),
        "rouge_l": mean(rouge_l(preds, refs)),
        "bleu": bleu(preds, refs),
        "chrf": chrf(preds, refs),
    }


def _pairs(preds: Sequence[str], refs: Sequence[Reference]) -> list[tuple[str, list[str]]]:
    """(prediction, references as a non-empty list) per example, after checking the shapes."""
    if isinstance(preds, str) or isinstance(refs, str):
        raise TypeError("predictions and references must be lists with one entry per example, not a string")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references: give one reference per example")
    out = []
    for i, (pred, ref) in enumerate(zip(preds, refs)):
        options = [ref] if isinstance(ref, str) else list(ref)
        if not isinstance(pred, str) or not options or not all(isinstance(r, str) for r in options):
            raise TypeError(
                f"example {i}: the prediction must be a string and the reference a string or a non-empty"
                f" list of strings (got {type(pred).__name__} and {ref!r})"
            )
        out.append((pred, options))
    return out


def _best(pred: str, options: list[str], score) -> float:
    return max(score(pred, ref) for ref in options)


def _sacrebleu_args(preds: Sequence[str], refs: Sequence[Reference]) -> tuple[list[str], list[list[str | None]]]:
    """sacrebleu wants reference *streams* (stream j = every example's j-th reference);
    examples with fewer references are padded with None, which sacrebleu skips."""
    pairs = _pairs(preds, refs)
    if not pairs:
        raise ValueError("no predictions to score")
    width = max(len(options) for _, options in pairs)
    streams = [[options[j] if j < len(options) else None for _, options in pairs] for j in range(width)]
    return [pred for pred, _ in pairs], streams
