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

import inspect
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import torch

from taskfit.errors import TaskfitError
from taskfit.models.attention import expanded_cache, prefix_key
from taskfit.models.base import GenerationRequest
from taskfit.models.decoding import Detokenizer, draw, filter_logits, find_stop, sample_seed
from taskfit.models.scoring import SharedStarts
from taskfit.models.slots import (
    ROW_ATTENTION,
    STEP,
    NotThroughInterface,
    SlotCache,
    Step,
    register_row_attention,
    slots_usable,
)


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
            register_row_attention()

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
            except NotThroughInterface:
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
            raise TaskfitError(
                f"prompt.max_new_tokens: {max_new_tokens} new tokens leave no room for the prompt in this model's "
                f"context of {self.max_length} tokens. Lower max_new_tokens (well below {self.max_length})."
            )
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
        cache = SlotCache(self._slot_count(len(waiting), limit, sizes), limit)
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
        except NotThroughInterface:
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
        self, tokens: dict[int, int], live: list[int], rows: int, cache: SlotCache, check: bool
    ) -> torch.Tensor:
        """One step of `rows` rows, the `live` slots' first and dummies after them: (len(live), V)
        float32 logits of each live slot's next token."""
        device = self.device
        cache.reserve(max(cache.lengths) + 1)
        cache.begin_step(live, device)
        dummies = rows - len(live)
        ids = torch.tensor([[tokens[s]] for s in live] + [[0]] * dummies, device=device)
        positions = torch.tensor([[cache.lengths[s]] for s in live] + [[0]] * dummies, device=device)
        step = Step(live, [cache.lengths[s] + 1 for s in live])
        placeholder = torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=device)  # a 4D mask is passed through as is
        config = self.model.config
        before = config._attn_implementation
        token = STEP.set(step)
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
                raise NotThroughInterface from exc
            raise
        finally:
            config._attn_implementation = before
            STEP.reset(token)
        self.forward_calls += 1
        if check and step.calls != len(cache.keys):
            raise NotThroughInterface
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
