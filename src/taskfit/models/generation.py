"""Batched, seeded text generation with a transformers causal LM.

For each request the prompt is run once, at batch 1, filling a key/value cache; the cache
is then repeated to one row per sample and all samples decode together, one token per
step. A row that finishes (EOS, a stop string, or `max_new_tokens`) is dropped from the
batch and the cache, so it costs nothing afterwards.

Sampling is reproducible per sample: sample `i` of a request draws from its own
`torch.Generator`, seeded from (request.seed, i, the context text). The same request
therefore gives the same samples whatever else is generated with it and in whatever
order; with `samples=4` the samples are the first four of `samples=8`. Greedy decoding
(temperature 0) is an argmax and ignores the seed.

Text follows lm-evaluation-harness: the context is tokenized without special tokens (an
empty context becomes the BOS token, or EOS where there is none), the continuation is
decoded on its own with special tokens skipped (and without the legacy clean-up of spaces
before punctuation), and it is cut before the first stop string.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch

from taskfit.models.base import GenerationRequest


def validate(req: GenerationRequest) -> None:
    """Raise ValueError for settings that cannot be honoured."""
    if req.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {req.max_new_tokens}.")
    if req.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {req.temperature}.")
    if not 0 < req.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {req.top_p}.")
    if req.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {req.top_k}.")
    if req.samples < 1:
        raise ValueError(f"samples must be at least 1, got {req.samples}.")
    if req.samples > 1 and req.temperature == 0:
        raise ValueError(
            f"samples={req.samples} with temperature 0 would repeat one greedy answer; set a temperature above 0."
        )
    if any(not s for s in req.stop):
        raise ValueError("stop strings must not be empty.")


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


class Generation(NamedTuple):
    """One generated continuation."""

    text: str
    """The continuation, cut before the first stop string."""
    tokens: list[int]
    """Every token generated, up to the one that completed a stop string; EOS not included."""
    finish: str
    """Why it ended: 'eos', 'stop' (a stop string) or 'length' (max_new_tokens)."""


@dataclass
class _Row:
    """One sample being decoded."""

    detok: Detokenizer
    rng: torch.Generator | None
    result: Generation | None = None  # set when finished
    steps: int = 0


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


@dataclass
class Generator:
    """Generates continuations for `GenerationRequest`s with a causal LM from transformers."""

    model: object
    tokenizer: object
    max_length: int
    truncated: int = 0
    """How many requests had their prompt cut from the left to leave room for `max_new_tokens`."""
    forward_calls: int = 0
    """Model forward passes run so far (prefills and decode steps)."""

    def __post_init__(self):
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.stop_ids = _eos_ids(self.model, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """`req.samples` continuations per request, in request order."""
        for req in requests:
            validate(req)
        return [[g.text for g in self.run(req)] for req in requests]

    def encode(self, context: str, max_new_tokens: int) -> list[int]:
        """Prompt tokens as lm-eval builds them, cut from the left so prompt + new tokens fit."""
        if context:
            ids = self.tokenizer(context, add_special_tokens=False).input_ids
        else:
            bos = self.tokenizer.bos_token_id
            ids = [self.tokenizer.eos_token_id if bos is None else bos]
        room = self.max_length - max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in {self.max_length}.")
        if len(ids) > room:
            ids = ids[-room:]
            self.truncated += 1
        return ids

    @torch.no_grad()  # not inference_mode: under it, autocast re-casts every weight at every call (3x slower)
    def run(self, req: GenerationRequest) -> list[Generation]:
        """The `req.samples` continuations of one request, with their tokens and finish reasons."""
        validate(req)
        ids = torch.tensor([self.encode(req.context, req.max_new_tokens)], device=self.device)
        logits, cache = self._forward(ids, None)  # prefill once, batch 1
        cache.batch_repeat_interleave(req.samples)
        logits = logits.expand(req.samples, -1)
        rows = [_Row(Detokenizer(self.tokenizer), self._rng(req, i)) for i in range(req.samples)]
        alive = list(range(req.samples))
        while True:
            tokens = self._pick(logits, [rows[i] for i in alive], req).tolist()
            still = [k for k, (i, tok) in enumerate(zip(alive, tokens)) if not self._step(rows[i], tok, req)]
            if not still:
                break
            if len(still) < len(alive):
                cache.batch_select_indices(torch.tensor(still, device=self.device))
            alive = [alive[k] for k in still]
            step_ids = torch.tensor([[tokens[k]] for k in still], device=self.device)
            logits, cache = self._forward(step_ids, cache)
        return [row.result for row in rows]

    def _forward(self, ids: torch.Tensor, cache):
        """Logits of the last position, (B, V) float32, and the updated cache."""
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        out = self.model(input_ids=ids, use_cache=True, **self._keep_kw, **kwargs)
        self.forward_calls += 1
        new_cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits[:, -1].float(), new_cache

    def _rng(self, req: GenerationRequest, index: int) -> torch.Generator | None:
        if req.temperature == 0:
            return None
        rng = torch.Generator()  # on the CPU: the same random numbers whatever the model's device
        rng.manual_seed(sample_seed(req.seed, index, req.context))
        return rng

    def _pick(self, logits: torch.Tensor, rows: list[_Row], req: GenerationRequest) -> torch.Tensor:
        """Next token per row: argmax when greedy, else a draw from each row's own generator."""
        if req.temperature == 0:
            return logits.argmax(-1)
        probs = filter_logits(logits, req.temperature, req.top_k, req.top_p).softmax(-1)
        return draw(probs, [row.rng for row in rows])

    def _step(self, row: _Row, token: int, req: GenerationRequest) -> bool:
        """Feed one token to a row; True when the row is finished (its `result` is then set)."""
        row.steps += 1
        eos = token in self.stop_ids
        done = eos or row.steps >= req.max_new_tokens
        piece = "" if eos else row.detok.push(token)
        if done:
            piece += row.detok.flush()
        at = find_stop(row.detok.text, piece, req.stop) if piece and req.stop else -1
        if at >= 0:
            row.result = Generation(row.detok.text[:at], row.detok.tokens, "stop")
            return True
        if done:
            row.result = Generation(row.detok.text, row.detok.tokens, "eos" if eos else "length")
        return done


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """The tokenizer's EOS and those of the model's generation config (which may list several)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    return frozenset(ids)
