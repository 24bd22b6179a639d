"""Llama-architecture checkpoints scored without transformers' model code.

A run that only scores (classification, multiple choice, calibration, ensembles) spends its
start-up importing the model code of transformers, which imports torch._dynamo,
torch.distributed and scipy.optimize whatever the model: ~1.8 s on the default CPU, against ~1 s
for torch itself and ~3 s of scoring on the five-shot benchmark job. For a local folder in the
plain Llama architecture (no biases, no RoPE scaling: SmolLM2 and the default model among
them) with safetensors weights and a plain `tokenizer.json`, scoring runs on the small model below and the `tokenizers`
library instead: the same operations in the same order as transformers' `LlamaModel`, and so
the same bits, in float32 and under bf16 autocast (tested against transformers on a tiny model
and on the default model). `llama_folder` says which folders qualify; anything else, and
generation on any model, runs on transformers' own classes (`HFLM` loads them on first use).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from taskfit.models.attention import direct_attention

PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""Tokenizer classes transformers builds from `tokenizer.json` as it is (others, such as
`LlamaTokenizer`, may rebuild its normalizer from their own settings), so that the `tokenizers`
library gives the same ids."""


@dataclass(frozen=True)
class LlamaShape:
    """What a plain Llama checkpoint's `config.json` says about its layers."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool


def llama_folder(folder: Path) -> LlamaShape | None:
    """The shape of the checkpoint in `folder` where this module reproduces it exactly: a
    `LlamaForCausalLM` with SiLU, no biases, default RoPE, unquantized safetensors weights and a
    plain `tokenizer.json` (see `PLAIN_TOKENIZERS`); None for anything else."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tokenizer = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(tokenizer, dict):
        return None
    rope = _rope_theta(config)
    plain = (
        _special_tokens(folder) is not None
        and config.get("model_type") == "llama"
        and config.get("architectures") == ["LlamaForCausalLM"]
        and config.get("hidden_act", "silu") == "silu"
        and not config.get("attention_bias")
        and not config.get("mlp_bias")
        and config.get("pretraining_tp", 1) in (1, None)
        and "quantization_config" not in config
        and rope is not None
        and tokenizer.get("tokenizer_class") in PLAIN_TOKENIZERS
        and not tokenizer.get("split_special_tokens")
        and (folder / "tokenizer.json").is_file()
        and bool(_weight_files(folder))
    )
    if not plain:
        return None
    sizes = {k: config.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
    sizes["num_attention_heads"] = heads = config.get("num_attention_heads")
    sizes["num_key_value_heads"] = config.get("num_key_value_heads") or heads
    sizes["max_position_embeddings"] = config.get("max_position_embeddings", 2048)
    eps = config.get("rms_norm_eps", 1e-6)
    if not all(_whole(v) and v > 0 for v in sizes.values()) or not isinstance(eps, int | float):
        return None  # as transformers would not read it (it says why, or refuses it)
    head_dim = config.get("head_dim") or sizes["hidden_size"] // heads
    if not _whole(head_dim):
        return None
    return LlamaShape(
        **sizes,
        head_dim=head_dim,
        rms_norm_eps=float(eps),
        rope_theta=rope,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _special_tokens(folder: Path) -> dict[str, str | None] | None:
    """The start and end tokens (`bos_token`, `eos_token`) of the tokenizer in `folder`, from
    `tokenizer_config.json` or, as older transformers saved them, `special_tokens_map.json`;
    None where the two files disagree (which one transformers would take is left to it)."""
    tokens: dict[str, str | None] = {"bos_token": None, "eos_token": None}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in tokens:
            value = data.get(key) if isinstance(data, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                if tokens[key] not in (None, value):
                    return None
                tokens[key] = value
    return tokens


def _rope_theta(config: dict) -> float | None:
    """The RoPE base where the checkpoint uses default RoPE (no scaling), else None. A
    `rope_scaling` entry wins over `rope_parameters` in transformers, and either may name its
    type `type` (older) or `rope_type`: any scaling at all leaves the folder to transformers."""
    if config.get("rope_scaling") is not None:
        return None
    params = config.get("rope_parameters")
    if params is None:
        theta = config.get("rope_theta", 10000.0)
    elif isinstance(params, dict) and params.get("rope_type", params.get("type", "default")) == "default":
        theta = params.get("rope_theta")
    else:
        return None
    return float(theta) if isinstance(theta, int | float) and not isinstance(theta, bool) else None


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: one, or the shards its index names."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    try:
        index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
        files = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [folder / f for f in files] if all((folder / f).is_file() for f in files) else []


class Linear(nn.Module):
    """`nn.Linear` without a bias, its weight left unset until the checkpoint's is assigned (nn's
    own initializes it at random: on the meta device that imports torch._dynamo, ~0.8 s)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    """`nn.Embedding`'s forward (its padding index only changes gradients), weight as `Linear`'s."""

    def __init__(self, vocab_size: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """Llama's RMS norm, computed in float32 and multiplied in the input's dtype (as transformers)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = shape.head_dim
        self.scaling = shape.head_dim**-0.5
        heads, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
        self.q_proj = Linear(shape.hidden_size, heads)
        self.k_proj = Linear(shape.hidden_size, kv)
        self.v_proj = Linear(shape.hidden_size, kv)
        self.o_proj = Linear(heads, shape.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask, cache) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d); `rope`: cos and sin (B, T, head_dim)."""
        split = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(split).transpose(1, 2)  # (B, heads, T, head_dim)
        k = self.k_proj(x).view(split).transpose(1, 2)
        v = self.v_proj(x).view(split).transpose(1, 2)
        cos, sin = (r.unsqueeze(1) for r in rope)
        q, k = (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, _ = direct_attention(self, q, k, v, mask, scaling=self.scaling)
        return self.o_proj(out.reshape(*x.shape[:-1], -1).contiguous())


class MLP(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.gate_proj = Linear(shape.hidden_size, shape.intermediate_size)
        self.up_proj = Linear(shape.hidden_size, shape.intermediate_size)
        self.down_proj = Linear(shape.intermediate_size, shape.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(shape, layer_idx)
        self.mlp = MLP(shape)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope, mask, cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class BodyOutput:
    last_hidden_state: torch.Tensor
    cache: Any = None


class KeyValueCache:
    """Each layer's keys and values of the tokens run so far (B, kv heads, T, head_dim), grown as
    transformers' `DynamicCache` grows them (so with the same memory layout)."""

    def __init__(self):
        self.layers: list[SimpleNamespace] = []

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer:
            self.layers.append(SimpleNamespace(keys=None, values=None))
        entry = self.layers[layer]
        if entry.keys is None:
            entry.keys = torch.tensor([], dtype=keys.dtype, device=keys.device)
            entry.values = torch.tensor([], dtype=values.dtype, device=values.device)
        entry.keys = torch.cat([entry.keys, keys], dim=-2)
        entry.values = torch.cat([entry.values, values], dim=-2)
        return entry.keys, entry.values


def inverse_frequencies(shape: LlamaShape) -> torch.Tensor:
    """Default RoPE's inverse frequencies (head_dim / 2,), float32, as transformers computes them."""
    return 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float) / shape.head_dim))


class LlamaBody(nn.Module):
    """Embeddings, decoder layers and the final norm. Called as `TreeScorer` calls transformers'
    bodies: a 4D additive mask (B, 1, T, keys) or none (causal), position ids, and a cache to fill
    with `use_cache`."""

    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.embed_tokens = Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape, i) for i in range(shape.num_hidden_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.register_buffer("inv_freq", inverse_frequencies(shape), persistent=False)

    def rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, T, head_dim) of the positions' angles, in the dtype of `x`."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KeyValueCache | None = None,
        use_cache: bool = False,
    ) -> BodyOutput:
        x = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = KeyValueCache()
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None]
        rope = self.rope(x, position_ids)
        for layer in self.layers:
            x = layer(x, rope, attention_mask, cache)
        return BodyOutput(self.norm(x), cache)


class LlamaForScoring(nn.Module):
    """Body + LM head, with what `TreeScorer` and `HFLM` read of a transformers model."""

    direct_attention = True
    """Its attention calls `attention.direct_attention` (see `attention.buckets_apply`)."""

    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.shape = shape
        self.config = SimpleNamespace(max_position_embeddings=shape.max_position_embeddings, model_type="llama")
        self.model = LlamaBody(shape)
        self.lm_head = Linear(shape.hidden_size, shape.vocab_size)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def base_model(self) -> LlamaBody:
        return self.model

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def get_output_embeddings(self) -> Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.lm_head(self.model(input_ids).last_hidden_state))


def load_llama(folder: Path, shape: LlamaShape, dtype: torch.dtype) -> LlamaForScoring:
    """The checkpoint in `folder` (see `llama_folder`) with weights in `dtype`, on the CPU."""
    from safetensors.torch import load_file

    model = LlamaForScoring(shape)  # empty weights: not written until assigned below
    weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        weights.update(load_file(file))
    head, embeddings = weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
    if shape.tie_word_embeddings and head is not None:
        if embeddings is None or not torch.equal(head, embeddings):  # transformers keeps such a head apart
            raise ValueError("tie_word_embeddings, but the weights hold an output layer of their own")
        weights.pop("lm_head.weight")
    weights = {name: tensor.to(dtype) for name, tensor in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [m for m in missing if not (shape.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"not a Llama checkpoint's weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if shape.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _named_tokens(config: dict) -> list[str]:
    """Every token string a `tokenizer_config.json` names: special tokens, added tokens, extra ones."""
    named = [config.get(key) for key in SPECIAL_TOKENS]
    decoder = config.get("added_tokens_decoder")
    named += list(decoder.values()) if isinstance(decoder, dict) else []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key)
        named += list(extra.values()) if isinstance(extra, dict) else list(extra) if isinstance(extra, list) else []
    tokens = [t.get("content") if isinstance(t, dict) else t for t in named]
    return [t for t in tokens if isinstance(t, str)]


class PlainTokenizer:
    """A `tokenizer.json` read by the `tokenizers` library itself, with what scoring asks of a
    transformers tokenizer (ids of texts without special tokens, the start and end tokens' ids,
    whether there is a chat template). Anything else (chat templates, special tokens, decoding)
    goes to transformers' own tokenizer, loaded on first use."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.folder = folder
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        unknown = [t for t in _named_tokens(config) if self._tokenizer.token_to_id(t) is None]
        if unknown:  # transformers adds them (new ids, text split on them): not a plain tokenizer.json
            raise ValueError(f"tokens named in tokenizer_config.json but not in tokenizer.json: {unknown[:3]}")
        special = _special_tokens(folder) or {}
        self.bos_token_id = self._token_id(special.get("bos_token"))
        self.eos_token_id = self._token_id(special.get("eos_token"))
        self.model_max_length = config.get("model_max_length", int(1e30))
        template = folder / "chat_template.jinja"
        self.chat_template = template.read_text(encoding="utf-8") if template.is_file() else config.get("chat_template")
        self._full = None

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **kwargs) -> Any:
        if add_special_tokens or kwargs:
            return self.full(text, add_special_tokens=add_special_tokens, **kwargs)
        texts = [text] if isinstance(text, str) else list(text)
        ids = [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]
        return SimpleNamespace(input_ids=ids[0] if isinstance(text, str) else ids)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "full":
            raise AttributeError(name)
        return getattr(self.full, name)

    @property
    def full(self):
        """transformers' tokenizer for the same folder."""
        if self._full is None:
            from transformers import AutoTokenizer

            self._full = AutoTokenizer.from_pretrained(self.folder)
        return self._full
