"""Log-likelihood scoring that computes every shared token once.

A *group* is one context with several continuations (the choices of one example, or the
answer strings of all labels). Each group becomes one row laid out as a small tree:

    [context tokens][cont 1 tokens][cont 2 tokens]...

with a 4D attention mask in which each continuation sees the context and its own earlier
tokens, never another continuation, and position ids that restart after the context for
every continuation. A prefix shared by groups (the start their requests declare shared, see
`shared_length`: fixed few-shot demonstrations for a whole run, or one example's own for its
queries) is run once and reused as a key/value cache; a call's prefixes run together in
batches, and rows after different prefixes share batches, each attending to its own. The LM
head runs only at the positions whose next-token log-probability is needed.

Token semantics follow lm-evaluation-harness: the continuation's score is the sum of
log p(token | everything before) over its tokens; the final token of a continuation
is never fed to the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from taskfit.errors import TaskfitError
from taskfit.models.attention import (
    attention_width,
    batch_cache,
    bucketed_attention,
    buckets_apply,
    prefix_key,
    row_cache,
    tree_mask,
)

MIN_SHARED_PREFIX = 16  # below this, a separate cached forward costs more than it saves


@dataclass
class Group:
    context: list[int]
    continuations: list[list[int]]


@dataclass
class _Row:
    group: int
    tokens: list[int]
    positions: list[int]
    owner: list[int]  # -1 for context tokens, else the continuation's index
    targets: list[tuple[int, int, int]]  # (continuation index, row position of its logits, target token)
    prefix: int = 0  # length of the cached prefix the row continues


def shared_prefix_length(groups: list[Group]) -> int:
    """Longest token prefix common to every context, leaving each at least one own token."""
    if len(groups) < 2:
        return 0
    first = groups[0].context
    limit = min(len(g.context) for g in groups) - 1
    n = 0
    while n < limit and all(g.context[n] == first[n] for g in groups):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def shared_length(head: list[int], ids: list[int]) -> int:
    """How many of a context's tokens `ids` run as its shared start, given the start's own
    tokenization `head`: the tokens both have in common (a separator's blank line is one token at
    the end of a text and two before a word, so the start may end a token early), not the last
    (its logits are needed), and at least `MIN_SHARED_PREFIX`, else none."""
    n = min(common_length(head, ids), len(ids) - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


class SharedStarts:
    """How many of a context's tokens are the shared start its request declares (`Request.shared`,
    `GenerationRequest.shared`; see `shared_length`), each start's own tokenization kept: a run
    has a few, one per template and demonstration set."""

    KEEP = 64

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tokens: dict[str, list[int]] = {}

    def length(self, context: str, shared: int, ids: list[int]) -> int:
        """Of `ids`, the tokens of `context`, how many run as its first `shared` characters."""
        if not 0 < shared < len(context):
            return 0
        head = context[:shared]
        if head not in self._tokens:
            if len(self._tokens) >= self.KEEP:
                self._tokens.clear()
            self._tokens[head] = self.tokenizer(head, add_special_tokens=False).input_ids
        return shared_length(self._tokens[head], ids)


def common_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two token lists have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def build_row(index: int, group: Group, offset: int) -> _Row:
    """Lay a group out as one tree-shaped row; `offset` is the length of the cached prefix."""
    ctx = group.context[offset:]
    tokens, positions, owner = list(ctx), list(range(offset, offset + len(ctx))), [-1] * len(ctx)
    targets = []
    for j, cont in enumerate(group.continuations):
        prev = len(ctx) - 1  # logits for the first continuation token come from the last context token
        for k, tok in enumerate(cont):
            targets.append((j, prev, tok))
            if k < len(cont) - 1:
                tokens.append(tok)
                positions.append(offset + len(ctx) + k)
                owner.append(j)
                prev = len(tokens) - 1
    return _Row(index, tokens, positions, owner, targets, offset)


HEAD_ROWS = 128
"""Positions per LM-head call (see `TreeScorer._head_logprobs`): enough that reading the head's
weights (vocabulary x hidden) is small next to the product itself."""

BATCH_OVERHEAD = 32
"""Fixed cost of one forward pass, in tokens: what a batch must save in padding to be split off."""

PREFIX_TOKENS_KEPT = 4096
"""Tokens of shared prefixes whose key/value caches are kept between calls, per autocast state
(the latest is always kept): each template of an ensemble has its own, and every chunk of the
run needs them again."""


def output_transform(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's own forward does to the LM head's output after the head: Gemma 2/3
    soft-capping, Cohere's logit scale, Granite's logits scaling (identity for Llama & co)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)  # Cohere keeps it on the model
    divisor = getattr(config, "logits_scaling", None)  # Granite
    scale = float(scale) if isinstance(scale, (int, float)) else 1.0
    factor = scale / float(divisor) if divisor else scale

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if factor != 1.0:
            logits = logits * factor
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


class TreeScorer:
    """Scores groups with a causal LM from transformers (body + LM head used separately)."""

    def __init__(self, model, batch_tokens: int = 4096):
        self.model = model
        self.body = model.base_model
        self.head = model.get_output_embeddings()
        self.transform = output_transform(model)
        self.batch_tokens = batch_tokens
        self.tokens = 0
        """Tokens run through the model body so far (shared prefixes once, padding not counted)."""
        self.padded_tokens = 0
        """The same, padding included: what the batches cost."""
        self._prefixes: dict[tuple, object] = {}
        """Shared prefixes' key/value caches, the latest per autocast state (see `_prefix_caches`)."""
        params = inspect.signature(self.body.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def check_output_layer(self, name: str) -> None:
        """The body + head (+ `output_transform`) must give the model's own logits: an architecture
        that changes its logits in some other way would be scored wrongly, so it is refused."""
        vocab = self.head.weight.shape[0]
        ids = torch.arange(1, 9, device=self.device)[None] % vocab
        seen = []  # the body's output inside the model's own forward: one forward for both
        hook = self.body.register_forward_hook(lambda _m, _a, out: seen.append(getattr(out, "last_hidden_state", None)))
        try:
            full = self.model(input_ids=ids).logits.float()
        finally:
            hook.remove()
        hidden = seen[0] if len(seen) == 1 and seen[0] is not None else self.body(input_ids=ids).last_hidden_state
        ours = self.transform(self.head(hidden)).float()
        diff = (full - ours).abs().max().item()
        if not diff <= 1e-3 * (1.0 + full.abs().max().item()):
            raise TaskfitError(
                f"model.name: {name} ({type(self.model).__name__}) changes its output logits in a way taskfit's "
                f"scorer does not reproduce (largest difference {diff:.3g}); its scores would be wrong. Use another "
                "model, or report the architecture to taskfit."
            )

    @torch.no_grad()  # not inference_mode: under it, autocast re-casts every weight at every call (3x slower)
    def score(self, groups: list[Group], offset: int | list[int] | None = None) -> list[list[tuple[float, bool]]]:
        """For each group, (summed log-probability, is greedy) per continuation. `offset`: how many
        leading context tokens run once as a cached prefix, per group or one for all (groups
        with the same leading tokens share one prefix); by default `shared_prefix_length(groups)`.
        Rows of different prefixes batch together (each attends to its own), so a group's scores
        depend on its own tokens and offset alone."""
        if offset is None:
            offset = shared_prefix_length(groups)
        offsets = [offset] * len(groups) if isinstance(offset, int) else list(offset)
        starts = [tuple(g.context[:n]) for g, n in zip(groups, offsets)]
        needed = _Needed()
        for wave in self._waves(starts):
            # every prefix of the wave is held while its rows run (the kept ones may be dropped meanwhile)
            kv = self._prefix_caches(list(dict.fromkeys(starts[i] for i in wave)))
            rows = [build_row(i, groups[i], offsets[i]) for i in wave]
            for batch in self._batches(rows):
                # rows alike in width and prefix length side by side: fewer, larger attention calls
                batch.sort(key=lambda r: (-attention_width(len(r.tokens)), r.prefix, -len(r.tokens), r.group))
                needed.add(batch, self._score_batch(batch, [kv.get(starts[r.group]) for r in batch]))
        out: list[list[tuple[float, bool]]] = [[(0.0, True)] * len(g.continuations) for g in groups]
        if needed.target:
            picked, greedy = self._head_logprobs(torch.cat(needed.hidden), needed.slot, needed.target)
            needed.sum_into(out, picked, greedy)
        return out

    @staticmethod
    def _waves(starts: list[tuple[int, ...]]) -> Iterator[list[int]]:
        """The groups (by their cached prefixes' tokens, `starts`) in runs whose distinct prefixes
        hold at most `PREFIX_TOKENS_KEPT` tokens together (one longer prefix: a run of its own), so
        that the key/value caches alive at once stay bounded however many prefixes a call declares."""
        wave: list[int] = []
        seen: set[tuple[int, ...]] = set()
        held = 0
        for i in sorted(range(len(starts)), key=lambda i: (len(starts[i]), starts[i])):
            prefix = starts[i]
            if prefix not in seen:
                if wave and held + len(prefix) > PREFIX_TOKENS_KEPT:
                    yield wave
                    wave, seen, held = [], set(), 0
                seen.add(prefix)
                held += len(prefix)
            wave.append(i)
        if wave:
            yield wave

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows sorted by length, cut into the batches that cost least: each batch costs its padded
        size (rows x longest row) plus `BATCH_OVERHEAD` tokens' worth of fixed cost, and stays
        within `batch_tokens`. (Cutting greedily at `batch_tokens` padded ~25% of the tokens.)"""
        order = sorted(rows, key=lambda r: (-len(r.tokens), r.group))
        n, inf = len(order), float("inf")
        cost, cut = [0.0] + [inf] * n, [0] * (n + 1)  # best cost of the first i rows; where its last batch starts
        for i in range(1, n + 1):
            for j in range(i - 1, -1, -1):  # last batch = order[j:i], longest row first
                padded = len(order[j].tokens) * (i - j)
                if padded > self.batch_tokens and j < i - 1:
                    break
                if cost[j] + padded + BATCH_OVERHEAD < cost[i]:
                    cost[i], cut[i] = cost[j] + padded + BATCH_OVERHEAD, j
        batches, i = [], n
        while i > 0:
            batches.append(order[cut[i] : i])
            i = cut[i]
        return batches[::-1]

    def _prefix_caches(self, prefixes: list[tuple[int, ...]]) -> dict[tuple[int, ...], object]:
        """The key/value caches of shared prefixes (the empty one has none). Those not kept are
        computed together, in batches whose rows attend at their own widths (see
        `attention._bucketed_attention`), so a prefix's cache has the same bits alone and beside others.
        The last ones computed are kept, per autocast state, up to `PREFIX_TOKENS_KEPT` tokens:
        every chunk of a run with fixed demonstrations shares the same prefixes. Whether a
        prefix is shared never depends on this memory, so neither do the scores."""
        out, missing = {}, []
        for prefix in filter(None, prefixes):
            key = prefix_key(prefix, self.device)
            if key in self._prefixes:
                out[prefix] = self._prefixes[key] = self._prefixes.pop(key)  # now the most recent
            else:
                missing.append(prefix)
        rows = [_Row(i, list(p), list(range(len(p))), [-1] * len(p), []) for i, p in enumerate(missing)]
        for batch in self._batches(rows):
            output = self._forward(batch, [None] * len(batch), use_cache=True)
            cache = output.cache if self._cache_kw == "cache" else output.past_key_values
            for i, row in enumerate(batch):
                prefix = missing[row.group]
                out[prefix] = self._keep(prefix, row_cache(cache, i, len(prefix)))
        return out

    def _keep(self, prefix: tuple[int, ...], kv):
        """Keep `kv` as the most recent prefix cache, dropping the oldest of its autocast state
        beyond `PREFIX_TOKENS_KEPT` tokens."""
        key = prefix_key(prefix, self.device)
        kept, room = {}, PREFIX_TOKENS_KEPT - len(prefix)
        for k in reversed(self._prefixes):  # the most recent first
            if k[1:] != key[1:] or len(k[0]) <= room:
                kept[k] = self._prefixes[k]
                room -= len(k[0]) if k[1:] == key[1:] else 0
        self._prefixes = dict(reversed(kept.items()))
        self._prefixes[key] = kv
        return kv

    def _score_batch(self, batch: list[_Row], prefixes: list) -> torch.Tensor:
        """The body's last hidden states (B, T, d) of a batch of rows, each after the key/value
        cache of its prefix (`prefixes`, per row; None: none)."""
        return self._forward(batch, prefixes).last_hidden_state

    def _forward(self, batch: list[_Row], prefixes: list, use_cache: bool = False):
        """The body's output for a batch of rows (see `_score_batch`); `use_cache`: with the
        key/value cache of the rows' own tokens."""
        lengths = [len(r.tokens) for r in batch]
        b, t = len(batch), max(lengths)
        longest = max(r.prefix for r in batch)
        self.tokens += sum(lengths)
        self.padded_tokens += b * t
        # Laid out in numpy, one row at a time, then turned into tensors at once (per-row torch
        # calls cost more than the rows of a small model).
        ids = np.zeros((b, t), dtype=np.int64)
        pos = np.zeros((b, t), dtype=np.int64)
        owner = np.full((b, t), -2, dtype=np.int64)  # -2: padding
        for i, (row, n) in enumerate(zip(batch, lengths)):
            ids[i, :n], pos[i, :n], owner[i, :n] = row.tokens, row.positions, row.owner
            pos[i, n:] = row.positions[-1] if n else row.prefix
        allowed = torch.zeros(b, t, longest + t, dtype=torch.bool)
        for i, row in enumerate(batch):
            allowed[i, :, : row.prefix] = True  # every query sees its row's cached prefix
        allowed[:, :, longest:] = tree_mask(torch.from_numpy(owner), torch.tensor(lengths))
        dtype = self.head.weight.dtype
        mask = torch.zeros(b, 1, t, longest + t, dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        ids, pos = torch.from_numpy(ids), torch.from_numpy(pos)
        kwargs = {}
        if longest and not buckets_apply(self.model):  # else the buckets put each row's prefix before it
            kwargs[self._cache_kw] = batch_cache(prefixes, [r.prefix for r in batch])
        with bucketed_attention(self.model, lengths, [r.prefix for r in batch], prefixes):
            return self.body(
                input_ids=ids.to(self.device),
                position_ids=pos.to(self.device),
                attention_mask=mask.to(self.device),
                use_cache=use_cache,
                **kwargs,
            )

    def _head_logprobs(self, hidden: torch.Tensor, slot: list[int], target: list[int]) -> tuple[list, list]:
        """Per target: its float32 log-probability at its position (a row of `hidden`), and whether
        it is that position's argmax. The head runs on blocks of exactly HEAD_ROWS positions (the
        last one padded): a matrix product's kernel, and so its rounding, can change with its
        number of rows, which must not make a score depend on its batch. Only one block's
        full-vocabulary log-probabilities exist at a time."""
        n = hidden.shape[0]
        padded = torch.cat([hidden, hidden.new_zeros((-n) % HEAD_ROWS, hidden.shape[1])]) if n % HEAD_ROWS else hidden
        at, tgt = torch.tensor(slot, device=hidden.device), torch.tensor(target, device=hidden.device)
        picked = torch.empty(len(slot), dtype=torch.float32, device=hidden.device)
        greedy = torch.empty(len(slot), dtype=torch.bool, device=hidden.device)
        for k, block in enumerate(padded.split(HEAD_ROWS)):
            logprobs = self.transform(self.head(block)).log_softmax(-1, dtype=torch.float32)  # one pass from bf16 too
            mine = (at >= k * HEAD_ROWS) & (at < (k + 1) * HEAD_ROWS)
            local = at[mine] - k * HEAD_ROWS
            picked[mine] = logprobs[local, tgt[mine]]
            greedy[mine] = logprobs.argmax(-1)[local] == tgt[mine]
        return picked.tolist(), greedy.tolist()


class _Needed:
    """The positions whose next-token log-probabilities a call needs, gathered batch by batch.
    The LM head runs once per position that some target needs: the first tokens of a group's
    continuations all follow its last context token (one position for all single-token labels
    of a classification group)."""

    def __init__(self):
        self.hidden: list[torch.Tensor] = []  # per batch: (positions, d)
        self.slot: list[int] = []  # per target: its position's index among all gathered
        self.target: list[int] = []
        self.where: list[tuple[int, int]] = []  # per target: (group, continuation)
        self.count = 0

    def add(self, batch: list[_Row], hidden: torch.Tensor) -> None:
        slots: dict[tuple[int, int], int] = {}  # (row in batch, position) -> index
        for i, row in enumerate(batch):
            for j, p, tok in row.targets:
                self.slot.append(self.count + slots.setdefault((i, p), len(slots)))
                self.target.append(tok)
                self.where.append((row.group, j))
        if slots:
            rows_idx, pos_idx = zip(*slots)
            self.hidden.append(hidden[torch.tensor(rows_idx), torch.tensor(pos_idx)])
            self.count += len(slots)

    def sum_into(self, out: list[list[tuple[float, bool]]], picked: list[float], greedy: list[bool]) -> None:
        """Sum each continuation's token log-probabilities; greedy when every token is the argmax."""
        sums: dict[tuple[int, int], list] = {}
        for key, lp, g in zip(self.where, picked, greedy):
            acc = sums.setdefault(key, [0.0, True])
            acc[0] += lp
            acc[1] = acc[1] and g
        for (group, j), (lp, g) in sums.items():
            out[group][j] = (lp, g)
