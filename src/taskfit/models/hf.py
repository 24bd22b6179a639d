"""The transformers backend: loading (device, dtype), lm-eval-compatible tokenization of
(context, continuation) pairs, and left truncation of over-long contexts."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import torch

from taskfit.config import ModelConfig
from taskfit.errors import TaskfitError
from taskfit.models.base import GenerationRequest, Request
from taskfit.models.generation import Generator
from taskfit.models.registry import resolve
from taskfit.models.scoring import Group, TreeScorer

log = logging.getLogger(__name__)


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device == "cpu" and cpu_has_native_bf16() else torch.float32


class HFLM:
    """A causal LM from transformers behind the `LM` contract."""

    def __init__(self, model, tokenizer, identity: dict[str, Any], batch_tokens: int = 4096):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.identity = identity
        self.scorer = TreeScorer(model, batch_tokens)
        self.max_length = _max_length(model, tokenizer)
        self.truncated = 0
        """How many groups had their context cut from the left to fit `max_length`."""
        self.generator = Generator(model, tokenizer, self.max_length)

    @classmethod
    def load(cls, config: ModelConfig) -> HFLM:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        resolved = resolve(config.name)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved.path)
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype).to(device)
        except OSError as exc:
            raise TaskfitError(
                f"model.name: cannot load '{config.name}' ({exc}). Offline, a hub id works only when it is "
                "already in the Hugging Face cache; otherwise give a local folder, a .gguf file or an alias."
            ) from None
        identity = {**resolved.identity, "dtype": str(dtype).removeprefix("torch."), "device": device}
        return cls(model, tokenizer, identity, config.batch_tokens)

    def chat(self, user_message: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise TaskfitError(
                f"prompt.chat: model '{self.identity.get('name')}' has no chat template. "
                "Set `chat: false` for this run."
            )
        messages = [{"role": "user", "content": user_message}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def loglikelihood(self, requests: list[Request]) -> list[float]:
        return [lp for lp, _ in self.loglikelihood_greedy(requests)]

    def loglikelihood_greedy(self, requests: list[Request]) -> list[tuple[float, bool]]:
        """Log-likelihood and whether the continuation is the greedy one, per request."""
        groups: dict[tuple[int, ...], Group] = {}
        where = []
        for req in requests:
            ctx, cont = self._encode_pair(req.context, req.continuation)
            group = groups.setdefault(tuple(ctx), Group(ctx, []))
            where.append((tuple(ctx), len(group.continuations)))
            group.continuations.append(cont)
        ordered = list(groups.values())
        for g in ordered:
            self._fit(g)
        index = {key: i for i, key in enumerate(groups)}
        results = self.scorer.score(ordered)
        return [results[index[key]][j] for key, j in where]

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """`samples` continuations per request: the prompt runs once, samples decode together."""
        before = self.generator.truncated
        outputs = self.generator.generate(requests)
        self.truncated += self.generator.truncated - before
        return outputs

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As lm-evaluation-harness does: trailing spaces of the context move into the
        # continuation; the pair is tokenized as one string and split at the context's length.
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        if not stripped:
            prefix = self.tokenizer.bos_token_id
            prefix = self.tokenizer.eos_token_id if prefix is None else prefix
            return [prefix], self._encode(continuation)
        whole = self._encode(stripped + continuation)
        ctx = self._encode(stripped)
        return ctx, whole[len(ctx) :]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _fit(self, group: Group) -> None:
        """Cut the context from the left so the longest continuation fits the model."""
        longest = max((len(c) for c in group.continuations), default=0)
        excess = len(group.context) + longest - 1 - self.max_length
        if excess > 0:
            if excess >= len(group.context):
                raise TaskfitError(
                    f"an answer option is {longest} tokens long, more than the model's context of {self.max_length}."
                )
            group.context = group.context[excess:]
            self.truncated += 1


def _max_length(model, tokenizer) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 1_000_000 else 2048
