"""Batched, seeded text generation with a transformers causal LM.

Requests decode together in *slots* (one row each, one token per step). Each request's
prompt runs once, alone at batch 1, filling a key/value cache that is copied into a slot for
each of its samples. A request may name the start of its context that others share (`shared`:
fixed demonstrations); that start runs once per run, and each prompt then runs only its own
tokens; a row that finishes (EOS, a stop string, or `max_new_tokens`) frees its slot, and the
next waiting row takes it at the next step.

A row's output never depends on what else is generated with it: each row attends to exactly
its own keys in a call of its own, its cache sits in its slot at the same offsets whatever the
other slots hold, and a step runs 8, 16, 32 or 64 rows (`STEP_ROWS`; free places carry a dummy
token), each size only where the model has been seen to give every row the same bits at it and
at every smaller one, wherever the row sits (`Generator.step_rows`; at least 8). Greedy output is
the same alone, in a batch of requests, in any order, resumed or not.

Sampling is reproducible per sample: sample `i` of a request draws from its own
`torch.Generator`, seeded from (request.seed, i, the context text). The same request
therefore gives the same samples whatever else is generated with it and in whatever
order; with `samples=4` the samples are the first four of `samples=8`. Greedy decoding
(temperature 0) is an argmax and ignores the seed.

Models whose attention the slots cannot stand in for (sliding windows, soft-capped
attention scores, or attention that does not go through transformers' attention
interface) decode one request at a time instead, its samples batched.

Text follows lm-evaluation-harness: the context is tokenized without special tokens (an
empty context becomes the BOS token, or EOS where there is none), the continuation is
decoded on its own with special tokens skipped (and without the legacy clean-up of spaces
before punctuation), and it is cut before the first stop string.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from taskfit.models.base import GenerationRequest
from taskfit.models.scoring import SharedStarts, expanded_cache, prefix_key


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
    request: int = 0  # index of its request in the call
    sample: int = 0


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


STEP_ROWS = (8, 16, 32, 64)
"""Rows a decoding step may run (the fewest that hold the live rows; free places carry a dummy
token). A matrix product's rounding can change with its number of rows (on this project's CPU,
float32 products of 1-3 rows differ from those of 4 or more), so only these sizes are used, and
sizes above the first only after `Generator.step_rows` has seen them give the same bits. On that
CPU (default model, ~100 keys per row) a step of 8, 16, 32, 64 or 128 rows took 62, 78, 114, 168
or 302 ms in bf16 (114, 110, 155, 224 or 480 in float32): per row 7.8, 4.9, 3.6, 2.6, 2.4 ms (14,
6.9, 4.8, 3.5, 3.8). Many rows decode faster in bigger steps (24 prompts x 8 samples: 39 s in
steps of at most 32 rows, 30-32 s with 64), 128 gains little in bf16 and loses in float32 (and
doubles the slots' memory), and a lone row is not made to pay for 63 dummies."""

SLOT_MEMORY = 2 * 1024**3
"""Bytes the slots' key/value cache may take at the call's longest row before a call gets fewer
slots (never fewer than `STEP_ROWS[0]`)."""

UNSUPPORTED_ATTENTION = ("sliding_window", "softcap", "s_aux", "position_bias")
"""Arguments a model's layers may hand its attention that `_row_attention` does not apply."""

ROW_ATTENTION = "taskfit_rows"
"""Name under which `_row_attention` is registered in transformers' attention interface."""


@dataclass
class _Step:
    """What `_row_attention` needs to know during one decoding step."""

    slots: list[int]  # the slot of each of the step's rows that holds a row (the rest are dummies)
    lengths: list[int]  # keys of each of those rows, the one written this step included
    calls: int = 0  # attention layers run: each must come through `_row_attention`


_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("taskfit_decoding_step", default=None)


def _row_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a decoding step over `_SlotCache` storage: each live row's query (one
    token) attends to exactly its own keys, in a call of its own (the same call, with the same
    shapes, as if it were alone); dummy rows give zeros. `attention_mask` is a placeholder:
    the slots and lengths come from `_STEP`. Returns (rows, 1, heads, head dim), as
    transformers' attention functions do."""
    step = _STEP.get()
    if any(kwargs.get(name) is not None for name in UNSUPPORTED_ATTENTION):
        raise _NotThroughInterface  # attention the per-row call would leave out
    step.calls += 1
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # The query heads that share a key/value head attend as that head's queries: no copies of the keys.
    packed = query.reshape(rows, kv_heads, heads // kv_heads, dim).to(key.dtype)
    out = packed.new_zeros(rows, kv_heads, heads // kv_heads, dim)
    for j, (slot, n) in enumerate(zip(step.slots, step.lengths)):
        k = key[slot : slot + 1, :, :n]  # (1, Hkv, n, D): the same strides in every slot
        v = value[slot : slot + 1, :, :n]
        out[j] = F.scaled_dot_product_attention(packed[j : j + 1], k, v, scale=scaling)[0]  # 4D: torch's fused kernel
    return out.reshape(rows, 1, heads, dim), None


def _register_row_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ROW_ATTENTION, _row_attention)


class _SlotCache:
    """Keys and values of `slots` rows, each left-aligned in its own slot: (slots, kv heads,
    capacity, head dim) per layer, so a row's keys have the same layout in any slot and each of
    its heads' keys lie in one block, as attention reads them at every step (on this project's
    CPU, decoding CoT prompts, ~25% less time in attention than with the heads interleaved). Filled by
    `insert` from a prefill's cache, then one token per step through `update` (the model's
    cache interface), at each live slot's own length, in the dtype attention computes in. The
    capacity grows with the longest row."""

    def __init__(self, slots: int, limit: int):
        self.slots = slots
        self.limit = limit  # the longest any row of the call can grow: prompt + max_new_tokens
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # allocated at the first `insert`, in the dtype attention computes in
        self.values: list[torch.Tensor] = []
        self.lengths = [0] * slots

    def reserve(self, length: int) -> None:
        """Room for `length` tokens in every slot: grown by doubling, up to `limit`. A row's keys
        keep their layout (strides) whatever the room, so growing changes no result."""
        if length <= self.capacity or not self.keys:
            self.capacity = max(self.capacity, length)
            return
        room = min(max(length, 2 * self.capacity), max(self.limit, length))
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                extra = old.new_zeros(self.slots, old.shape[1], room - self.capacity, old.shape[3])
                store[layer] = torch.cat([old, extra], dim=2)
        self.capacity = room

    def insert(self, slot: int, cache) -> None:
        """Copy a batch-1 prefill cache (transformers' DynamicCache) into `slot`."""
        for layer, (k, v) in enumerate(_layers(cache)):
            n = k.shape[2]
            if layer == 0:
                self.reserve(n)
            if layer == len(self.keys):
                shape = (self.slots, k.shape[1], self.capacity, k.shape[3])
                self.keys.append(k.new_zeros(shape, dtype=_attention_dtype(k)))
                self.values.append(v.new_zeros(shape, dtype=_attention_dtype(v)))
            self.keys[layer][slot, :, :n] = k[0]
            self.values[layer][slot, :, :n] = v[0]
        self.lengths[slot] = n

    def begin_step(self, live: list[int], device) -> None:
        """Where this step's tokens go: the step's first rows are the `live` slots, each token at
        its slot's length (the dummy rows after them are not kept), for every layer's `update`."""
        self._live = len(live)
        self._at = (torch.tensor(live, device=device), torch.tensor([self.lengths[s] for s in live], device=device))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write the live rows' keys and values of this step's (rows, kv heads, 1, head dim)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        slots, at = self._at
        keys[slots, :, at] = key_states[: self._live, :, 0].to(keys.dtype)
        values[slots, :, at] = value_states[: self._live, :, 0].to(values.dtype)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths)


def _attention_dtype(states: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in: autocast's where it is on (the cache keeps keys as
    attention will read them, cast once rather than at every step), else the states' own."""
    device = states.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else states.dtype


def _layers(cache):
    """(keys, values) per layer of a transformers cache, each (batch, kv heads, length, head dim)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def slots_usable(model) -> bool:
    """Whether `_row_attention` can stand in for the model's attention: full causal attention in
    every layer, no soft-capping. (Whether its layers call the attention interface at all is
    checked at the first step.)"""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params and "attention_mask" in params


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
        self._prefix: tuple[tuple, object] | None = None  # see `_prefix_cache`
        self.starts = SharedStarts(self.tokenizer)
        """Where each request's declared shared start ends in its prompt's tokens."""
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.stop_ids = _eos_ids(self.model, self.tokenizer)
        self.slots = slots_usable(self.model)
        """Whether requests decode together in slots (else one request at a time)."""
        self._step_rows: dict[tuple, tuple[int, ...]] = {}  # see `step_rows`
        if self.slots:
            _register_row_attention()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """`req.samples` continuations per request, in request order."""
        return [[g.text for g in gens] for gens in self.run_all(requests)]

    def run(self, req: GenerationRequest) -> list[Generation]:
        """The `req.samples` continuations of one request, with their tokens and finish reasons."""
        return self.run_all([req])[0]

    def run_all(self, requests: list[GenerationRequest]) -> list[list[Generation]]:
        """Every request's continuations, with their tokens and finish reasons."""
        for req in requests:
            validate(req)
        if self.slots:
            try:
                return self._run_slots(requests)
            except _NotThroughInterface:
                self.slots = False  # the model's layers bypass the attention interface: one at a time
        return [self._run_alone(req) for req in requests]

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
    def _run_slots(self, requests: list[GenerationRequest]) -> list[list[Generation]]:
        truncated = self.truncated
        prompts = [self.encode(req.context, req.max_new_tokens) for req in requests]
        results: list[list[Generation | None]] = [[None] * req.samples for req in requests]
        waiting = deque((r, i) for r, req in enumerate(requests) for i in range(req.samples))
        if not waiting:
            return []
        limit = max(len(ids) + req.max_new_tokens for ids, req in zip(prompts, requests))
        sizes = self.step_rows()
        cache = _SlotCache(self._slot_count(len(waiting), limit, sizes), limit)
        slots: list[_Row | None] = [None] * cache.slots
        prefilled: dict[int, tuple[torch.Tensor, object]] = {}  # request -> (first logits, cache) while samples wait
        logits = None  # (slots, V) of the last step
        first_step = True
        try:
            while True:
                joined = []
                for s in range(cache.slots):
                    if slots[s] is None and waiting:
                        r, i = waiting.popleft()
                        if r not in prefilled:
                            prefilled[r] = self._prefill(requests[r], prompts[r])  # once, alone, at batch 1
                        first, prompt_cache = prefilled[r]
                        cache.insert(s, prompt_cache)
                        if i == requests[r].samples - 1:
                            del prefilled[r]
                        slots[s] = _Row(Detokenizer(self.tokenizer), self._rng(requests[r], i), request=r, sample=i)
                        joined.append((s, first))
                if logits is None:
                    logits = joined[0][1].new_zeros(cache.slots, joined[0][1].shape[-1])
                for s, first in joined:
                    logits[s] = first[0]
                live = [s for s in range(cache.slots) if slots[s] is not None]
                if not live:
                    break
                tokens = self._pick_slots(logits, slots, live, requests)
                for s in live:
                    row = slots[s]
                    if self._step(row, tokens[s], requests[row.request]):
                        results[row.request][row.sample] = row.result
                        slots[s] = None
                        cache.lengths[s] = 0
                live = [s for s in range(cache.slots) if slots[s] is not None]
                if not live and not waiting:
                    break
                if live:
                    rows = next(n for n in sizes if n >= len(live))
                    logits[live] = self._decode(tokens, live, rows, cache, check=first_step)
                    first_step = False
        except _NotThroughInterface:
            self.truncated = truncated
            raise
        return results

    def _prefill(self, req: GenerationRequest, ids: list[int]) -> tuple[torch.Tensor, object]:
        """A prompt's last logits and its cache, at batch 1. After the start it shares with other
        requests (`req.shared`), only its own tokens run, on a view of that start's cache."""
        n = self._split(req, ids)
        if not n:
            return self._forward(torch.tensor([ids], device=self.device), None)
        return self._forward(
            torch.tensor([ids[n:]], device=self.device), expanded_cache(self._prefix_cache(ids[:n]), 1)
        )

    def _split(self, req: GenerationRequest, ids: list[int]) -> int:
        """How many of the prompt's tokens are its shared start (`shared_length` of the prompt and
        `req.context[:req.shared]` tokenized alone; none for a prompt cut from the left). A
        property of the request alone: a row computes the same whatever the call holds."""
        return self.starts.length(req.context, req.shared, ids)

    def _prefix_cache(self, prefix: list[int]):
        """The key/value cache of a shared start, computed once per run: the latest is kept (per
        autocast state), and every chunk of a run with fixed demonstrations starts with it."""
        key = prefix_key(prefix, self.device)
        if self._prefix is None or self._prefix[0] != key:
            self._prefix = None  # the old one's memory goes first
            self._prefix = (key, self._forward(torch.tensor([prefix], device=self.device), None)[1])
        return self._prefix[1]

    def _decode(
        self, tokens: dict[int, int], live: list[int], rows: int, cache: _SlotCache, check: bool
    ) -> torch.Tensor:
        """One step of `rows` rows, the `live` slots' first and dummies after them: (len(live), V)
        float32 logits of each live slot's next token."""
        device = self.device
        cache.reserve(max(cache.lengths) + 1)
        cache.begin_step(live, device)
        dummies = rows - len(live)
        ids = torch.tensor([[tokens[s]] for s in live] + [[0]] * dummies, device=device)
        positions = torch.tensor([[cache.lengths[s]] for s in live] + [[0]] * dummies, device=device)
        step = _Step(live, [cache.lengths[s] + 1 for s in live])
        placeholder = torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=device)  # a 4D mask is passed through as is
        config = self.model.config
        before = config._attn_implementation
        token = _STEP.set(step)
        config._attn_implementation = ROW_ATTENTION
        try:
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=placeholder,
                use_cache=True,
                **{self._cache_kw: cache},
                **self._keep_kw,
            )
        except Exception as exc:
            if check and step.calls < len(cache.keys):  # a layer of its own met the slot layout and failed
                raise _NotThroughInterface from exc
            raise
        finally:
            config._attn_implementation = before
            _STEP.reset(token)
        self.forward_calls += 1
        if check and step.calls != len(cache.keys):
            raise _NotThroughInterface
        for s in live:
            cache.lengths[s] += 1
        return out.logits[: len(live), -1].float()

    def step_rows(self) -> tuple[int, ...]:
        """The sizes of `STEP_ROWS` a decoding step may run under the current autocast state: the
        first, and each next one while one token per row gives every row the same logits, bit for
        bit, at that size and wherever the row sits in the step (seen once per state: the model's
        products and norms are the same at every step)."""
        device = self.device.type
        state = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if state not in self._step_rows:
            self._step_rows[state] = self._alike_sizes()
        return self._step_rows[state]

    @torch.no_grad()
    def _alike_sizes(self) -> tuple[int, ...]:
        """`STEP_ROWS` up to the first size (after the first) at which 8 tokens, each alone in its
        row, do not get the logits they get in a step of the first size, placed in order at the
        start of the step, then reversed at its end. Each row attends to itself only, as in a
        step, where each row's attention is a call of its own."""
        first = STEP_ROWS[0]
        vocab = self.model.get_input_embeddings().weight.shape[0]
        probe = (torch.arange(first, device=self.device) * 7919 + 1) % vocab

        def logits(ids: torch.Tensor) -> torch.Tensor:
            out = self.model(input_ids=ids[:, None], use_cache=False, **self._keep_kw)
            return out.logits[:, -1]

        expected = logits(probe)
        for n, rows in enumerate(STEP_ROWS):
            filler = torch.full((rows - first,), 2, device=self.device)
            if not torch.equal(logits(torch.cat([filler, probe.flip(0)]))[rows - first :].flip(0), expected):
                return STEP_ROWS[: max(n, 1)]
        return STEP_ROWS

    def _slot_count(self, waiting: int, limit: int, sizes: tuple[int, ...]) -> int:
        """Slots for a call: the fewest step sizes that hold all its rows, fewer where their
        key/value cache at `limit` tokens each would pass `SLOT_MEMORY` (never below the first)."""
        wanted = next((n for n in sizes if n >= waiting), sizes[-1])
        per_slot = limit * self._cache_bytes_per_token()
        fits = [n for n in sizes if n <= wanted and n * per_slot <= SLOT_MEMORY]
        return max(fits, default=sizes[0])

    def _cache_bytes_per_token(self) -> int:
        """Bytes of keys and values one token takes in the slots' cache (from the model's config;
        a model that does not say is taken to need the whole budget per row)."""
        config = self.model.config
        layers = getattr(config, "num_hidden_layers", None)
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else None)
        if not (layers and kv_heads and dim):
            return SLOT_MEMORY
        device = self.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.model.dtype
        return 2 * layers * kv_heads * dim * dtype.itemsize

    def _pick_slots(self, logits: torch.Tensor, slots: list, live: list[int], requests) -> dict[int, int]:
        """Next token per live slot, each request's rows picked with its own settings."""
        by_request: dict[int, list[int]] = {}
        for s in live:
            by_request.setdefault(slots[s].request, []).append(s)
        tokens = {}
        for r, group in by_request.items():
            picked = self._pick(logits[group], [slots[s] for s in group], requests[r]).tolist()
            tokens.update(zip(group, picked))
        return tokens

    @torch.no_grad()
    def _run_alone(self, req: GenerationRequest) -> list[Generation]:
        """One request at a time (models the slots cannot serve): the prompt once at batch 1, then
        its samples together, finished ones dropped from the batch and the cache."""
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


class _NotThroughInterface(Exception):
    """The model's layers did not call `_row_attention`: its attention is its own."""


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
