"""How a batch of tree-shaped rows (see `scoring`) attends, and the key/value caches of prefixes.

Each run of rows of one width and prefix length gets its own call of the model's attention
(`_bucketed_attention`, registered in transformers' attention interface for the span of a
batch), so that a row's attention has the same shapes, and so the same rounding, alone and in
any batch. `tree_mask` says which keys each query of a row may see; `prefix_key`,
`expanded_cache`, `row_cache` and `batch_cache` build the DynamicCaches of shared prefixes.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def tree_mask(owner: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, T) boolean for a batch of rows, `owner` (B, T) padded past each row's length: a
    query q of a row may see key k of that row when k <= q and k is context or in q's
    continuation. A padding query sees one key (the one `length` places before it), so that it
    stays finite; what it computes is never read."""
    t = owner.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = (owner[:, None, :] == -1) | (owner[:, None, :] == owner[:, :, None])
    q = torch.arange(t)
    real = q[None, :] < lengths[:, None]  # (B, T)
    mask = causal & same & real[:, None, :] & real[:, :, None]
    padding = ~real[:, :, None] & (q[None, None, :] == q[None, :, None] - lengths[:, None, None])
    return mask | padding


ATTENTION_WIDTH = 4
"""Each row's attention runs over its own length rounded up to this, whatever its batch's longest
row (see `_bucketed_attention`)."""

BUCKETED_ATTENTION = "taskfit_buckets"
"""Name under which `_bucketed_attention` is registered in transformers' attention interface."""


@dataclass
class _Buckets:
    """What `_bucketed_attention` needs to know during one batch."""

    inner: Callable  # the model's own attention function (transformers' sdpa, ...)
    sdpa: bool  # whether that is transformers' sdpa
    spans: list[tuple[int, int, int, int]]  # (first row, end row, width, prefix) of each run of rows alike
    caches: list | None = None  # per row, its prefix's key/value cache (None: no prefix)
    calls: int = 0


_SDPA_EXTRAS = ("position_bias", "softcap", "s_aux", "output_attentions")
"""Arguments of transformers' sdpa attention that the direct call in `_bucketed_attention` leaves out."""

_BUCKETS: contextvars.ContextVar[_Buckets | None] = contextvars.ContextVar("taskfit_buckets", default=None)


def attention_width(length: int) -> int:
    """A row's attention width: its length rounded up to a multiple of `ATTENTION_WIDTH`."""
    return -(-max(length, 1) // ATTENTION_WIDTH) * ATTENTION_WIDTH


def attention_spans(lengths: list[int], prefixes: list[int] | None = None) -> list[tuple[int, int, int, int]]:
    """(first row, end row, width, prefix) per run of consecutive rows of the same width (see
    `attention_width`) that continue cached prefixes of the same length (`prefixes`, default none)."""
    spans: list[tuple[int, int, int, int]] = []
    for i, (n, p) in enumerate(zip(lengths, prefixes or [0] * len(lengths))):
        width = attention_width(n)
        if spans and spans[-1][2:] == (width, p):
            spans[-1] = (spans[-1][0], i + 1, width, p)
        else:
            spans.append((i, i + 1, width, p))
    return spans


def _bucketed_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own attention, run per span of rows of one width and prefix length
    (`attention_spans`): the rows' keys and values are their own tokens' (the batch runs without
    a cache), after which each span's prefixes are put before them (`_Buckets.caches`), and the
    queries and own keys are cut (or zero-padded) to the span's width. A row's attention has the
    same shapes, so the same rounding, in any batch (the kernels round differently at other key
    lengths: up to ~2e-5 on the default model's five-shot scores), and a prefix's keys exist
    once per span, never for the whole batch at once. The mask spans the batch's longest prefix,
    then the rows' own tokens. The padding a batch adds after a row gets zeros, which no real
    position reads. Returns (rows, length, heads, head dim), as transformers' attention
    functions do."""
    plan = _BUCKETS.get()
    plan.calls += 1
    rows, heads, t, dim = query.shape
    longest = attention_mask.shape[-1] - t  # the batch's longest prefix
    layer = getattr(module, "layer_idx", plan.calls - 1)
    out = None
    for start, end, width, prefix in plan.spans:
        q, k, v, m = query[start:end], key[start:end], value[start:end], attention_mask[start:end]
        if prefix:  # the rows' prefixes, then their own keys
            pk, pv = _prefix_keys(plan.caches[start:end], layer)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if prefix < longest:
            m = torch.cat([m[..., :prefix], m[..., longest:]], dim=-1)
        if width > t:  # the batch's longest rows: padded here, not in the layers around attention
            extra = width - t
            q, k, v = (F.pad(x, (0, 0, 0, extra)) for x in (q, k, v))
            m = F.pad(m, (0, extra, 0, extra), value=torch.finfo(m.dtype).min)
        else:
            keys = prefix + width
            q, k, v, m = q[:, :, :width], k[:, :, :keys], v[:, :, :keys], m[..., :width, :keys]
        if plan.sdpa and q.device.type == "cpu" and not any(kwargs.get(n) not in (None, False) for n in _SDPA_EXTRAS):
            # transformers' sdpa, without its copies of each key/value head per query head
            # (`repeat_kv`: it keeps them where a mask is given, for CUDA's sake): the same bits
            # on CPU, ~40% faster (five-shot rows, 9 query and 3 key/value heads).
            gqa = q.shape[1] != k.shape[1]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=kwargs.get("scaling"), enable_gqa=gqa)
            o = o.transpose(1, 2)
        else:
            o, _ = plan.inner(module, q, k, v, m, **kwargs)
        if out is None:
            out = o.new_zeros(rows, t, heads, dim)
        out[start:end, : min(width, t)] = o[:, : min(width, t)]
    return out, None


def _prefix_keys(caches: list, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's prefix keys and values for a span of rows (one prefix: a view per row)."""
    first = caches[0].layers[layer]
    if all(c is caches[0] for c in caches):
        n = len(caches)
        return first.keys.expand(n, -1, -1, -1), first.values.expand(n, -1, -1, -1)
    layers = [c.layers[layer] for c in caches]
    return torch.cat([x.keys for x in layers]), torch.cat([x.values for x in layers])


def _sdpa(module, query, key, value, attention_mask, scaling=None, **_kwargs):
    """Attention by `F.scaled_dot_product_attention` (causal without a mask), each key/value head
    serving its group of query heads; returns (rows, length, heads, head dim)."""
    gqa = query.shape[1] != key.shape[1]
    causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling, enable_gqa=gqa
    )
    return out.transpose(1, 2), None


def direct_attention(module, query, key, value, attention_mask, scaling=None):
    """The attention of models that call it themselves (`llama.LlamaForScoring`): within
    `bucketed_attention`, per span of rows; else `_sdpa`."""
    if _BUCKETS.get() is not None:
        return _bucketed_attention(module, query, key, value, attention_mask, scaling=scaling)
    return _sdpa(module, query, key, value, attention_mask, scaling=scaling)


def buckets_apply(model) -> bool:
    """Whether the model's attention is one `bucketed_attention` can run per span: one of
    transformers' registered functions (sdpa, flash, flex; not eager, which lives in each
    model's code), or `direct_attention`."""
    if getattr(model, "direct_attention", False):
        return True
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = getattr(model.config, "_attn_implementation", None)
    return implementation in ALL_ATTENTION_FUNCTIONS and implementation != BUCKETED_ATTENTION


@contextlib.contextmanager
def bucketed_attention(
    model, lengths: list[int], prefixes: list[int] | None = None, caches: list | None = None
) -> Iterator[None]:
    """Within: the model's attention runs through `_bucketed_attention` for rows of `lengths`
    after prefixes of `prefixes` tokens (their key/value `caches`, per row), where
    `buckets_apply` (else as it is)."""
    if not buckets_apply(model):
        yield
        return
    with _attention_switched(model) as (inner, sdpa):
        token = _BUCKETS.set(_Buckets(inner, sdpa, attention_spans(lengths, prefixes), caches))
        try:
            yield
        finally:
            _BUCKETS.reset(token)


@contextlib.contextmanager
def _attention_switched(model) -> Iterator[tuple[Callable, bool]]:
    """Within: the model's attention calls `_bucketed_attention`; yields the attention function
    it ran before and whether that is transformers' sdpa. A model that calls
    `direct_attention` itself needs no switch (its own attention is `_sdpa`); a transformers
    model's config names `_bucketed_attention`, registered in transformers' attention interface."""
    if getattr(model, "direct_attention", False):
        yield _sdpa, True
        return
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    before = config._attn_implementation
    if BUCKETED_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(BUCKETED_ATTENTION, _bucketed_attention)
    config._attn_implementation = BUCKETED_ATTENTION
    try:
        yield ALL_ATTENTION_FUNCTIONS[before], before == "sdpa"
    finally:
        config._attn_implementation = before


def prefix_key(prefix: Sequence[int], device: torch.device) -> tuple:
    """What a cached prefix's keys and values depend on: its tokens and the autocast state."""
    return (tuple(prefix), torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))


def expanded_cache(prefix_kv, batch_size: int):
    """A fresh DynamicCache holding the shared prefix, viewed (not copied) per batch row."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for i, layer in enumerate(prefix_kv.layers):
        keys = layer.keys.expand(batch_size, -1, -1, -1)
        values = layer.values.expand(batch_size, -1, -1, -1)
        cache.update(keys, values, i)
    return cache


def row_cache(cache, row: int, length: int):
    """A cache of the first `length` positions of one row of a batch's cache (copied, so that the
    batch's is freed), of the same kind (transformers' DynamicCache, `llama.KeyValueCache`)."""
    out = type(cache)()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[row : row + 1, :, :length].clone(), layer.values[row : row + 1, :, :length].clone(), i)
    return out


def batch_cache(prefixes: list, lengths: list[int]):
    """A fresh DynamicCache holding each row's prefix cache (`prefixes`, of `lengths` tokens; None
    where 0), for attention that does not go through `bucketed_attention`: one prefix for all,
    viewed per row; else each at the start of its row, zeros after it up to the longest (which
    the mask hides)."""
    from transformers.cache_utils import DynamicCache

    first = prefixes[lengths.index(max(lengths))]
    if all(p is first for p in prefixes):
        return expanded_cache(first, len(prefixes))
    cache = DynamicCache()
    for i, layer in enumerate(first.layers):
        keys = layer.keys.new_zeros(len(prefixes), *layer.keys.shape[1:])
        values = layer.values.new_zeros(len(prefixes), *layer.values.shape[1:])
        for row, (prefix, n) in enumerate(zip(prefixes, lengths)):
            if n:
                keys[row, :, :n] = prefix.layers[i].keys[0, :, :n]
                values[row, :, :n] = prefix.layers[i].values[0, :, :n]
        cache.update(keys, values, i)
    return cache
