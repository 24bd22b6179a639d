"""The transformers backend: loading (device, dtype), lm-eval-compatible tokenization of
(context, continuation) pairs, and left truncation of over-long contexts."""

from __future__ import annotations

import gc
import json
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from taskfit.config import ModelConfig
from taskfit.errors import TaskfitError
from taskfit.models.base import GenerationRequest, Request, top_gap
from taskfit.models.generation import Generator
from taskfit.models.llama import PlainTokenizer, llama_folder, load_llama
from taskfit.models.registry import resolve
from taskfit.models.scoring import Group, SharedStarts, TreeScorer

log = logging.getLogger(__name__)


def pick_device(name: str) -> str:
    """`auto`: a CUDA GPU where there is one, else the CPU; a device asked for must be there."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TaskfitError(f"model.device: '{name}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TaskfitError(
            f"model.device: {name}, but this torch sees no CUDA GPU (torch {torch.__version__}). "
            "Use device: auto (or cpu), or install a CUDA build of torch on a machine with a GPU."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TaskfitError(f"model.device: {name}, but only {torch.cuda.device_count()} CUDA GPU(s) are visible.")
    return name


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """The dtype of the weights and the dtype the matrix products run in (bf16 autocast when they differ)."""

    weights: torch.dtype
    compute: torch.dtype

    @property
    def name(self) -> str:
        """What manifests record (and what keys the score cache)."""
        weights = str(self.weights).removeprefix("torch.")
        if self.compute == self.weights:
            return weights
        return f"{str(self.compute).removeprefix('torch.')} autocast, {weights} weights"

    def autocast(self, device: str) -> Any:
        return torch.autocast(device.split(":")[0], self.compute, enabled=self.compute != self.weights)


def pick_precision(name: str, device: str) -> Precision:
    """`auto`: on a CPU with native bf16, float32 weights under bf16 autocast (as fast as bf16 weights
    here, and closer to float32: norms, residuals and the softmax stay float32); on a GPU, bf16
    weights where supported (half the memory); else float32."""
    if name == "float32":
        return Precision(torch.float32, torch.float32)
    if name == "bfloat16":
        return Precision(torch.bfloat16, torch.bfloat16)
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return Precision(dtype, dtype)
    if device == "cpu" and cpu_has_native_bf16():
        return Precision(torch.float32, torch.bfloat16)
    return Precision(torch.float32, torch.float32)


def _top_gap(scored: list[tuple[float, bool]]) -> float:
    """Log-likelihood gap between the two best continuations of a group (inf with fewer than two)."""
    return top_gap(lp for lp, _ in scored)


class HFLM:
    """A causal LM from transformers behind the `LM` contract."""

    def __init__(
        self,
        model,
        tokenizer,
        identity: dict[str, Any],
        batch_tokens: int = 4096,
        precision=None,
        recheck_margin: float = 0.0,
        full: Callable[[], tuple[Any, Any]] | None = None,
    ):
        self.model = model.eval()
        self.precision = precision or Precision(model.dtype, model.dtype)
        self.recheck_margin = recheck_margin
        self.rechecked = 0
        """Groups scored again in float32 because their two best continuations were within the margin."""
        self.tokenizer = tokenizer
        self.identity = identity
        self.scorer = TreeScorer(model, batch_tokens)
        self.max_length = _max_length(model, tokenizer)
        self.truncated = 0
        """How many groups had their context cut from the left to fit `max_length`."""
        self.starts = SharedStarts(tokenizer)
        """Where each request's declared shared start ends in its tokens."""
        self._full = full
        """Where `model` is taskfit's scoring-only one (`llama.LlamaForScoring`): loads transformers'
        model and tokenizer of the same checkpoint, for generation."""
        self._generator: Generator | None = None
        self._output_checked = False

    @property
    def generator(self) -> Generator:
        """The generator, made on first use. Where scoring ran on taskfit's own Llama model,
        transformers' model of the same checkpoint is loaded first and serves every call after
        (scoring included: the two give the same scores, bit for bit)."""
        if self._generator is None:
            if self._full is not None:
                self._use(*self._loaded_in_full())
            self._generator = Generator(self.model, self.tokenizer, self.max_length)
        return self._generator

    def _loaded_in_full(self) -> tuple[Any, Any]:
        """transformers' model and tokenizer, loaded as `models.load_model` and `models.frozen_load`
        load a model: importing its code makes about a million objects, made with the collector
        paused and, where the objects of the first load are frozen, frozen with them."""
        from taskfit.models import paused_collector

        with paused_collector():
            loaded = self._full()
            if gc.get_freeze_count():
                gc.freeze()
        return loaded

    def _use(self, model, tokenizer) -> None:
        """Run on `model` and `tokenizer` from now on (the scorer's counts carried over)."""
        before = self.scorer
        self.model, self.tokenizer, self._full = model.eval(), tokenizer, None
        self.scorer = TreeScorer(model, before.batch_tokens)
        self.scorer.tokens, self.scorer.padded_tokens = before.tokens, before.padded_tokens
        self.starts = SharedStarts(tokenizer)
        self._output_checked = False

    @classmethod
    def load(cls, config: ModelConfig, own_llama: bool = True) -> HFLM:
        """The model and tokenizer `config` names. A plain Llama checkpoint on the CPU scores on
        taskfit's own model (`llama`: the same scores without importing transformers' model code,
        ~1.8 s of a run's start-up; `own_llama=False`: on transformers' from the start);
        transformers' model is loaded where it generates."""
        resolved = resolve(config.name)
        folder = Path(resolved.path)
        _check_language_model(folder, config.name)
        device = pick_device(config.device)
        precision = pick_precision(config.dtype, device)
        full = partial(_load_transformers, resolved.path, config.name, precision.weights, device)
        own = _own_llama(folder, precision.weights) if own_llama and device == "cpu" else None
        if own is None:
            (model, tokenizer), full = full(), None
        else:
            model, tokenizer = own
        identity = {**resolved.identity, "dtype": precision.name, "device": device}
        if precision.compute != precision.weights and config.recheck_margin:
            identity["recheck_margin"] = config.recheck_margin  # it changes scores: part of the cache key
        return cls(model, tokenizer, identity, config.batch_tokens, precision, config.recheck_margin, full=full)

    def session(self) -> Any:
        """A context for many calls in a row: under bf16 autocast, the bf16 copies of the weights
        are made once for the whole session instead of once per call."""
        return self.precision.autocast(str(self.scorer.device))

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
        """Log-likelihood and whether the continuation is the greedy one, per request.

        The start a request declares shared (`Request.shared`: fixed demonstrations) runs once
        per call as a cached prefix, and each group's own tokens after it; groups and their
        continuations are laid out in a canonical order (sorted token ids, each pair once). A
        score therefore depends on neither the order, the repetition nor the company of the
        requests: where a row's prefix ends is its request's own, and its attention runs at its own
        width (see `attention.attention_spans`)."""
        return self._scored(requests, exact=False)

    def loglikelihood_exact(self, requests: list[Request]) -> list[float]:
        """Log-likelihoods computed in float32 whatever the precision (the weights' own dtype where
        they are not float32): under bf16 autocast, the scores a float32 run gives, bit for bit."""
        self.rechecked += len({r.context for r in requests})
        return [lp for lp, _ in self._scored(requests, exact=True)]

    def _scored(self, requests: list[Request], exact: bool) -> list[tuple[float, bool]]:
        keys = [
            (tuple(ctx), self.starts.length(req.context, req.shared, ctx), tuple(cont))
            for req, (ctx, cont) in zip(requests, self._encode_pairs(requests))
        ]
        by_context: dict[tuple[tuple[int, ...], int], set[tuple[int, ...]]] = {}
        for ctx, shared, cont in keys:
            by_context.setdefault((ctx, shared), set()).add(cont)
        groups, slot, offsets = [], {}, []
        for i, (ctx, shared) in enumerate(sorted(by_context)):
            conts = sorted(by_context[ctx, shared])
            slot.update({(ctx, shared, cont): (i, j) for j, cont in enumerate(conts)})
            groups.append(Group(list(ctx), [list(c) for c in conts]))
            offsets.append(0 if self._fit(groups[-1]) else shared)  # a context cut from the left shares no start
        with self._float32() if exact else self.precision.autocast(str(self.scorer.device)):
            self._check_output_layer()
            results = self.scorer.score(groups, offsets)
        if not exact:
            self._recheck_close_calls(groups, results, offsets)
        return [results[i][j] for i, j in (slot[key] for key in keys)]

    def _check_output_layer(self) -> None:
        """`TreeScorer.check_output_layer`, once, before the first scores: in the first call's
        autocast session (its weight copies serve the call), and never for a model that only
        generates."""
        if not self._output_checked:
            self.scorer.check_output_layer(str(self.identity.get("name") or type(self.model).__name__))
            self._output_checked = True

    def _float32(self) -> Any:
        """A context in which the products run in the weights' dtype (autocast off)."""
        return torch.autocast(self.scorer.device.type, enabled=False)

    def _recheck_close_calls(self, groups: list[Group], results: list, offsets: list[int]) -> None:
        """Score again, in float32, the groups that bf16 autocast left with a near-tie at the top,
        each after its own cached prefix, as in the call."""
        if not self.recheck_margin or self.precision.compute == self.precision.weights:
            return
        close = [i for i, scored in enumerate(results) if _top_gap(scored) < self.recheck_margin]
        if not close:
            return
        with self._float32():
            exact = self.scorer.score([groups[i] for i in close], [offsets[i] for i in close])
        for i, scored in zip(close, exact):
            results[i] = scored
        self.rechecked += len(close)

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        """`samples` continuations per request: each prompt runs once, and the requests' rows decode
        together in the generator's slots, each as it would alone."""
        before = self.generator.truncated
        with self.precision.autocast(str(self.scorer.device)):
            outputs = self.generator.generate(requests)
        self.truncated += self.generator.truncated - before
        return outputs

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self._encode_pairs([Request(context, continuation)])[0]

    def _encode_pairs(self, requests: list[Request]) -> list[tuple[list[int], list[int]]]:
        return encode_pairs(self.tokenizer, [(r.context, r.continuation) for r in requests])

    def _fit(self, group: Group) -> bool:
        """Cut the context from the left so the longest continuation fits the model; True if cut."""
        longest = max((len(c) for c in group.continuations), default=0)
        excess = len(group.context) + longest - 1 - self.max_length
        if excess > 0:
            if excess >= len(group.context):
                raise TaskfitError(
                    f"an answer option is {longest} tokens long, more than the model's context of {self.max_length}."
                )
            group.context = group.context[excess:]
            self.truncated += 1
            return True
        return False


def _own_llama(folder: Path, dtype: torch.dtype) -> tuple[Any, Any] | None:
    """taskfit's own Llama model and the plain tokenizer for `folder`, where `llama.llama_folder`
    accepts it and its files read; else None (transformers loads it, or says what is wrong)."""
    shape = llama_folder(folder)
    if shape is None:
        return None
    try:
        return load_llama(folder, shape, dtype), PlainTokenizer(folder)
    except Exception as exc:  # safetensors', tokenizers' and torch's own errors alike
        log.debug("%s: loading with transformers instead (%s)", folder, exc)
        return None


def _load_transformers(path: str, name: str, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    """transformers' causal LM (weights in `dtype`, on `device`) and tokenizer from `path`; `name`
    is what the user gave, for errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from huggingface_hub.errors import StrictDataclassError as refused
    except ImportError:  # an older huggingface_hub does not check configs' fields
        refused = ()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except refused as exc:  # a config.json field of the wrong type (huggingface_hub checks them)
        reason = " ".join(str(exc).split())
        raise TaskfitError(
            f"model.name: '{name}' has a config transformers refuses ({reason[:300]}). Fix the folder's "
            "config.json, or give another model."
        ) from None
    except OSError as exc:
        raise TaskfitError(
            f"model.name: cannot load '{name}' ({exc}). Offline, a hub id works only when it is "
            "already in the Hugging Face cache; otherwise give a local folder, a .gguf file or an alias."
        ) from None
    except (ValueError, KeyError, TypeError) as exc:  # what transformers raises for a folder with no usable model
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskfitError(
            f"model.name: '{name}' is not a model transformers can load ({reason}). Give a folder written "
            "by save_pretrained (config.json, weights and tokenizer files), a .gguf file or an alias."
        ) from None
    return model, tokenizer


LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
"""How transformers names the classes of models with a language-model head (what prompting reads)."""


def _check_language_model(folder: Path, name: str) -> None:
    """Refuse a local model whose config names only classes without a language-model head (a
    taskfit fine-tuning run exports `...ForSequenceClassification`, `...ForTokenClassification`):
    loaded for prompting, its head would be dropped and a random or untrained one scored."""
    config = folder / "config.json"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # not a local folder, or no readable config: transformers says what is wrong
    if architectures and not any(a.endswith(LM_HEADS) for a in architectures):
        raise TaskfitError(
            f"model.name: '{name}' is a {', '.join(architectures)}: a model with a task head, which has no "
            "language-model head to prompt with. Prompt the model it was fine-tuned from, or compare the fine-tuning "
            "run itself (its predictions are in its run folder)."
        )


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], joint: bool = True) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation) pair, as lm-evaluation-harness
    makes them: trailing spaces of the context move into the continuation, no special tokens are
    added, and an empty context becomes the start token (BOS, else EOS). The continuation's ids are
    those of context + continuation tokenized as one string, after the context's (`joint`), or those
    of the continuation tokenized alone (`joint=False`: what greedy decoding emits after the
    context). Scoring and fine-tuning both encode through here, so they agree. Every distinct text
    is encoded once, all in one call."""
    texts: dict[str, int] = {}
    plans = []
    for context, continuation in pairs:
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        ctx = texts.setdefault(stripped, len(texts)) if stripped else None
        whole = stripped + continuation if joint and stripped else continuation
        plans.append((ctx, texts.setdefault(whole, len(texts))))
    ids = tokenizer(list(texts), add_special_tokens=False).input_ids if texts else []
    start = tokenizer.bos_token_id
    start = tokenizer.eos_token_id if start is None else start
    out = []
    for ctx, cont in plans:
        if ctx is None:  # no context: the continuation follows the start token
            out.append(([start], ids[cont]))
        else:
            out.append((ids[ctx], ids[cont][len(ids[ctx]) :] if joint else ids[cont]))
    return out


def _max_length(model, tokenizer) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 1_000_000 else 2048
