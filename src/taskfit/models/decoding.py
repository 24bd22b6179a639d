"""The per-token pieces of generation: seeded sampling and incremental text with stop strings."""

from __future__ import annotations

import hashlib

import torch


def sample_seed(seed: int, index: int, context: str) -> int:
    """A stable 63-bit seed for sample `index` of a request (no dependence on PYTHONHASHSEED)."""
    digest = hashlib.blake2b(f"{seed}\0{index}\0{context}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of (N, V) float logits.

    Removed tokens get -inf; the most likely token always survives.
    """
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        logits = logits.masked_fill(~nucleus(logits.softmax(-1), top_p), float("-inf"))
    return logits


def nucleus(probs: torch.Tensor, top_p: float, first_k: int = 256) -> torch.Tensor:
    """(N, V) boolean: the tokens kept by top-p, as transformers' TopPLogitsWarper keeps them.

    A token is dropped when the more likely tokens before it already reach `top_p`. A full
    sort of the vocabulary costs more than the model step on CPU, so the candidates come
    from `topk`, widened until they hold `top_p` of the mass in every row.
    """
    vocab = probs.shape[-1]
    k = min(first_k, vocab)
    while True:
        top, order = torch.topk(probs, k, dim=-1)  # (N, k), most likely first
        if k == vocab or bool((top.sum(-1) >= top_p).all()):
            break
        k = min(vocab, k * 8)
    keep_sorted = (top.cumsum(-1) - top) < top_p
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)


def draw(probs: torch.Tensor, rngs: list[torch.Generator]) -> torch.Tensor:
    """One token per row of (N, V) probabilities, row i using only `rngs[i]` (CPU generators).

    Inverse-CDF sampling: one uniform number per row, so a row's draw never depends on the
    other rows, and it is ~10x cheaper on CPU than one `torch.multinomial` per row.
    """
    cdf = probs.double().cumsum(-1)  # float64: the cumulative sum over the vocabulary stays exact enough
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in rngs]).to(cdf.device)
    picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return picks.clamp_(max=probs.shape[-1] - 1)


class Detokenizer:
    """Decodes a growing token list a few tokens at a time (after vLLM's incremental detokenizer).

    Each step decodes only the window from the previous piece's start, so a token whose
    text depends on its neighbours (byte-level BPE split inside a UTF-8 character,
    SentencePiece leading spaces) comes out as the whole-sequence decode would give it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens before this index are already in `text`

    def push(self, token: int) -> str:
        """Append one token; return the text it completes ('' while a character is unfinished)."""
        self.tokens.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is pending, even an incomplete character."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.tokens):
            return ""
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += piece
        return piece

    def _decode(self, tokens: list[int]) -> str:
        # no clean-up of spaces: it rewrites text across window edges (" ." -> "."), so pieces would not add up
        if not tokens:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def find_stop(text: str, piece: str, stop: tuple[str, ...]) -> int:
    """Start of the earliest stop string that ends inside the newly added `piece`, or -1.

    Only the tail that can hold such a match is searched: earlier text was checked before.
    """
    best = -1
    for s in stop:
        start = max(0, len(text) - len(piece) - len(s) + 1)
        at = text.find(s, start)
        if at >= 0 and (best < 0 or at < best):
            best = at
    return best
