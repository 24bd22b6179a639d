"""The decoding slots: the key/value store of many rows decoding together (`SlotCache`) and
the attention that reads each row's own keys in a call of its own (`row_attention`), so a row's
output never depends on what else decodes beside it (see `generation`)."""

from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNSUPPORTED_ATTENTION = ("sliding_window", "softcap", "s_aux", "position_bias")
"""Arguments a model's layers may hand its attention that `row_attention` does not apply."""

ROW_ATTENTION = "taskfit_rows"
"""Name under which `row_attention` is registered in transformers' attention interface."""


@dataclass
class Step:
    """What `row_attention` needs to know during one decoding step."""

    slots: list[int]  # the slot of each of the step's rows that holds a row (the rest are dummies)
    lengths: list[int]  # keys of each of those rows, the one written this step included
    calls: int = 0  # attention layers run: each must come through `row_attention`


STEP: contextvars.ContextVar[Step | None] = contextvars.ContextVar("taskfit_decoding_step", default=None)


def row_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a decoding step over `SlotCache` storage: each live row's query (one
    token) attends to exactly its own keys, in a call of its own (the same call, with the same
    shapes, as if it were alone); dummy rows give zeros. `attention_mask` is a placeholder:
    the slots and lengths come from `STEP`. Returns (rows, 1, heads, head dim), as
    transformers' attention functions do."""
    step = STEP.get()
    if any(kwargs.get(name) is not None for name in UNSUPPORTED_ATTENTION):
        raise NotThroughInterface  # attention the per-row call would leave out
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


def register_row_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ROW_ATTENTION, row_attention)


class SlotCache:
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
        for layer, (k, v) in enumerate(cache_layers(cache)):
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


def cache_layers(cache):
    """(keys, values) per layer of a transformers cache, each (batch, kv heads, length, head dim)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def slots_usable(model) -> bool:
    """Whether `row_attention` can stand in for the model's attention: full causal attention in
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


class NotThroughInterface(Exception):
    """The model's layers did not call `row_attention`: its attention is its own."""
