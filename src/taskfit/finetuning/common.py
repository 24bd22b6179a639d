"""Pieces every fine-tuning recipe shares: load a model with a task head, add LoRA (peft),
predict logits, merge the adapter with a check, export a plain transformers folder, and
describe the run for the manifest.

A recipe is `prepare` → its own features → `training.train` → `final_model` → its own
rows from `predict_logits` → `save` and `info`. Recipes differ in the head
(`AutoModelFor...`), the features, the metric and the rows; everything else comes from
here (and `training`, `data`), so that recipes cannot drift apart.
Weights are float32 on every device; where `model.dtype` resolves to bfloat16 (`auto` on a GPU or
a CPU with native bf16), training and predictions run under bf16 autocast. The merge check
compares float32 logits.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskfit.errors import TaskfitError
from taskfit.finetuning import data, training
from taskfit.manifest import peak_memory_mb
from taskfit.models.registry import resolve

HEADS = ("classifier", "score", "pre_classifier", "qa_outputs")
"""Task heads new at fine-tuning time: trained in full even with LoRA (peft `modules_to_save`)."""
TARGETS = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Mistral, Qwen, SmolLM, Phi-3...
    ("query", "value"),  # BERT, MiniLM, RoBERTa, ELECTRA (LoRA paper's choice)
    ("q_lin", "v_lin"),  # DistilBERT
    ("query_key_value",),  # Falcon, GPT-NeoX, BLOOM
    ("c_attn",),  # GPT-2
)
"""LoRA targets when `target_modules` is not given: the first group whose names all occur."""
MERGE_TOLERANCE = 1e-4
MERGE_RELATIVE = 1e-4
"""The merge check passes when max |merged - adapter| <= MERGE_TOLERANCE + MERGE_RELATIVE * max |adapter|
over the probe's logits. Float32 rounding grows with the scale of the computation, not with each
logit's own size: it moved a causal LM's vocabulary logits (scale ~20) by 1.5e-4 after two epochs
of SFT, small logits included; a wrong merge moves them by orders of magnitude more."""
"""Max |logit difference| allowed between the merged and the unmerged model (float32)."""
MERGE_CHECK_INPUTS = 8


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    identity: dict[str, Any]
    heads: list[str]
    """Top-level modules that are task heads (known names, or weights new at loading): LoRA trains them in full."""


@dataclass
class Prepared:
    """A recipe's starting point: the data split, the model to train and what it was built from."""

    loaded: Loaded
    model: nn.Module
    """What the Trainer trains: the loaded model (full) or its peft wrapper (LoRA)."""
    train: list
    dev: list
    max_length: int
    trainable_parameters: int
    """Counted before training: merging removes the adapters."""
    auto_class: type
    head: dict[str, Any]


def prepare(job: Any, auto_class: type, task_type: str, stratify: Any, **head: Any) -> Prepared:
    """Seed, split train/dev (stratified on `stratify(example)`), load the model and add LoRA.

    `task_type` is peft's (SEQ_CLS, TOKEN_CLS, CAUSAL_LM, ...); `head` goes to `from_pretrained`."""
    from transformers import set_seed

    set_seed(job.seed)  # the new head and the LoRA matrices are initialised from it
    train, dev = data.train_and_dev(job.task, job.seed, job.where, key=stratify)
    loaded = load(job, auto_class, **head)
    model = loaded.model if job.config.method == "full" else add_lora(job, loaded.model, task_type, loaded.heads)
    trainable, _ = parameter_counts(model)
    return Prepared(loaded, model, train, dev, max_length(job, loaded), trainable, auto_class, head)


def max_length(job: Any, loaded: Loaded) -> int:
    """`max_length`, capped by what the model's position embeddings and tokenizer allow."""
    limits = [job.config.max_length, getattr(loaded.model.config, "max_position_embeddings", None)]
    limits.append(loaded.tokenizer.model_max_length if loaded.tokenizer.model_max_length < 1e6 else None)
    return min(x for x in limits if x)


def load(job: Any, auto_class: type, **head: Any) -> Loaded:
    """The job's model with the head of `auto_class` (new heads are initialised from the seed)."""
    from transformers import AutoTokenizer

    resolved = resolve(job.model.name)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    # Decoder LMs often have no pad token; padding positions are masked, so eos can stand in.
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TaskfitError(f"{job.where}: the tokenizer of '{job.model.name}' has neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps position ids equal for every batch layout (Llama does not derive them from
    # the mask); sequence classification finds the last real token either way.
    tokenizer.padding_side = "right"
    quantization = quantization_config(job)
    if quantization is not None:
        head = {**head, "quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}
    model, loading = _from_pretrained(auto_class, resolved.path, **head)
    model.config.pad_token_id = tokenizer.pad_token_id
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return Loaded(model, tokenizer, dict(resolved.identity), _heads(model, loading))


def _from_pretrained(auto_class: type, path: str, **kwargs: Any) -> tuple[nn.Module, dict]:
    """The model in float32, and transformers' loading report (missing / mismatched keys)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized weights ... TRAIN": that is the plan
    try:
        # ignore_mismatched_sizes: a fine-tuned folder with another label count is a valid base.
        return auto_class.from_pretrained(
            path, dtype=torch.float32, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
    finally:
        transformers.logging.set_verbosity(verbosity)


def _heads(model: nn.Module, loading: dict) -> list[str]:
    """Known head names, plus any top-level module outside the backbone whose weights are new:
    an unknown architecture's head must not stay frozen at its random initialisation under LoRA."""
    backbone = getattr(model, "base_model_prefix", "")
    new = [*loading.get("missing_keys", ()), *loading.get("mismatched_keys", ())]
    new = [k if isinstance(k, str) else k[0] for k in new]  # mismatched: (key, shape in file, shape here)
    fresh = {key.split(".")[0] for key in new if "." in key and key.split(".")[0] != backbone}
    return sorted(fresh | {h for h in HEADS if isinstance(getattr(model, h, None), nn.Module)})


def quantization_config(job: Any) -> Any:
    """4-bit NF4 for `method: qlora`; needs a CUDA GPU and bitsandbytes, and says so."""
    if job.config.method != "qlora":
        return None
    missing = []
    if job.model.device == "cpu" or not torch.cuda.is_available():
        missing.append(
            "a CUDA GPU (none is available" + (", model.device is cpu)" if job.model.device == "cpu" else ")")
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise TaskfitError(
            f"{job.where}: `method: qlora` loads the model in 4 bits, which needs {' and '.join(missing)}. "
            "Use `method: lora` (the same adapters on float32 weights) on this machine."
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def adaptable_modules(model: nn.Module, heads: list[str]) -> list[str]:
    """Names (last component) of the layers LoRA can adapt outside the heads: the `target_modules`
    menu (input embeddings tied to the output layer left out: see `add_lora`)."""
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D)
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, kinds) and name.split(".")[0] not in heads
    }
    return sorted(names - {tied_input_embeddings(model)})


def default_targets(model: nn.Module, heads: list[str]) -> list[str] | None:
    """The first known group present; else peft's own choice for the architecture; else None."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    present = set(adaptable_modules(model, heads))
    for group in TARGETS:
        if present.issuperset(group):
            return list(group)
    fallback = PEFT_DEFAULTS.get(getattr(model.config, "model_type", ""), [])
    return list(fallback) if fallback and present.issuperset(fallback) else None


def add_lora(job: Any, model: nn.Module, task_type: str, heads: list[str]) -> nn.Module:
    """Wrap `model` with LoRA adapters (peft); the `heads` are trained in full."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    cfg = job.config
    targets = cfg.target_modules or default_targets(model, heads)
    if not targets:
        _unadaptable(job, model, heads, "none of the layer names LoRA usually adapts occurs in it")
    tied = tied_input_embeddings(model)
    if tied in targets:
        _unadaptable(
            job,
            model,
            heads,
            f"its `{tied}` is tied to the output layer (one weight for both), so merging a LoRA update of it "
            "would change the output layer too, and the merged model would not be the one trained",
        )
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha or 2 * cfg.r,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=heads or None,
    )
    try:
        with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecates; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            return get_peft_model(model, lora)
    except NoMatchingPeftModuleError:
        _unadaptable(job, model, heads, f"no layer matches target_modules {targets}")
    except ValueError as exc:
        if "Target module" not in str(exc):
            raise
        _unadaptable(job, model, heads, f"peft cannot adapt target_modules {targets} ({exc})")


def tied_input_embeddings(model: nn.Module) -> str | None:
    """The name (last component) of the input embedding layer where it shares its weight with the
    output layer (`tie_word_embeddings`), else None."""
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # a model without them (or not from transformers)
        return None
    if inputs is None or outputs is None or getattr(inputs, "weight", None) is not getattr(outputs, "weight", 0):
        return None
    return next((name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is inputs), None)


def _unadaptable(job: Any, model: nn.Module, heads: list[str], why: str) -> None:
    menu = ", ".join(adaptable_modules(model, heads)) or "(none)"
    raise TaskfitError(
        f"{job.where}: LoRA cannot adapt model '{job.model.name}' ({type(model).__name__}): {why}. "
        f"Set `target_modules` to some of its layers: {menu}; or use `method: full`."
    )


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@torch.no_grad()
def predict_logits(
    model: nn.Module, features: list[dict], collator: Any, batch_size: int, bf16: bool = False
) -> torch.Tensor:
    """Logits of the head for each feature, in input order: (N, ...) float32 on the CPU.

    `bf16`: under bfloat16 autocast, as the model was trained and evaluated on dev (the merge
    check leaves it off: it compares float32 logits).

    Batches hold similar lengths (sorted), so little padding is computed; padding is masked,
    so the logits do not depend on the batch layout (up to float rounding). Per-token logits
    (N, L, C) or per-choice logits (N, choices) are padded with zeros past each batch's own
    length to the longest batch's: a feature's positions past its own length are not its own."""
    if not features:
        return torch.empty(0)
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    chunks = []
    for start in range(0, len(order), batch_size):
        batch = collator(
            [{k: v for k, v in features[i].items() if k != "labels"} for i in order[start : start + batch_size]]
        )
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        chunks.append(logits.float().cpu())
    logits = _concat(chunks)
    out = torch.empty_like(logits)
    out[torch.tensor(order)] = logits
    return out


def predict_test_logits(job: Any, model: nn.Module, features: list[dict], collator: Any) -> tuple[torch.Tensor, list]:
    """`predict_logits` of the test features as training computed (autocast), shared by the
    processes of a multi-process launch; with how many features each process predicted."""

    def predict(share: list[dict]) -> list[torch.Tensor]:
        logits = predict_logits(model, share, collator, job.config.batch_size, training.mixed_precision(job.model))
        return [row.clone() for row in logits]  # each row on its own: a view would carry the whole batch along

    rows, shares = training.across_processes(features, predict, job.model.device)
    return (_concat([row[None] for row in rows]) if rows else torch.empty(0)), shares


def _concat(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Batches of logits along dim 0, zero-padded on dim 1 where batches differ in length there."""
    if len({c.shape[1:] for c in chunks}) == 1:
        return torch.cat(chunks)
    width = max(c.shape[1] for c in chunks)
    return torch.cat([nn.functional.pad(c, (0, 0) * (c.dim() - 2) + (0, width - c.shape[1])) for c in chunks])


def merge_checked(job: Any, model: nn.Module, features: list[dict], collator: Any) -> tuple[nn.Module, float]:
    """Merge LoRA into the weights; stop if the merged model's logits differ from the adapter's.

    A merged adapter that behaves differently (peft #2321) would ship a model that is not the
    one evaluated; the figure goes into the manifest."""
    probe = features[:MERGE_CHECK_INPUTS]
    before = predict_logits(model, probe, collator, len(probe))
    merged = model.merge_and_unload()
    after = predict_logits(merged, probe, collator, len(probe))
    diff = float((before - after).abs().max()) if probe else 0.0
    allowed = MERGE_TOLERANCE + MERGE_RELATIVE * (float(before.abs().max()) if probe else 0.0)
    if not diff <= allowed:  # `not <=` also catches NaN
        raise TaskfitError(
            f"{job.where}: merging the LoRA adapter into '{job.model.name}' changed the logits by up to {diff:.3g} "
            f"(allowed: {allowed:.3g}, {MERGE_TOLERANCE:g} + {MERGE_RELATIVE:g} x the largest |logit|) on "
            f"{len(probe)} inputs, so the exported model would not be the one trained. Nothing was exported; the "
            f"unmerged adapter is in {job.folder / 'checkpoints'}. Try `method: full`, or report the model and "
            "peft version."
        )
    return merged, diff


def float32_base(job: Any, model: nn.Module, auto_class: type, **head: Any) -> nn.Module:
    """QLoRA: the trained adapter on a float32 copy of the base model, to merge without re-quantizing.

    (Merging into 4-bit weights rounds the update away; the float32 merge is what gets exported.)"""
    from peft import PeftModel

    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # the adapter and the trained head only
        base, _ = _from_pretrained(auto_class, resolve(job.model.name).path, **head)
        base.config.pad_token_id = model.config.pad_token_id
        return PeftModel.from_pretrained(base, tmp).to(device)


def final_model(
    job: Any, trainer: Any, prepared: Prepared, probe: list[dict], collator: Any = None
) -> tuple[nn.Module, float | None]:
    """The best checkpoint's model (the Trainer loaded it), LoRA merged in and checked on `probe`
    (batched by `collator`, default the Trainer's; it must keep one row per feature).

    Returns the model and the merge check's max |logit difference| (None for full fine-tuning)."""
    # Mixed precision wraps `forward` in autocast; the exported model and the float32 merge
    # check need the plain one (predictions opt back in to autocast).
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if job.config.method == "full":
        return model, None
    if job.config.method == "qlora":
        model = float32_base(job, model, prepared.auto_class, **prepared.head)
    return merge_checked(job, model, probe[:MERGE_CHECK_INPUTS], collator or trainer.data_collator)


def save(job: Any, trainer: Any, model: nn.Module, tokenizer: Any) -> Path:
    """Export the model once (main process), then drop the checkpoints it came from."""
    folder = job.folder / "model"
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        export(model, tokenizer, folder)
        training.remove_checkpoints(job.folder)
    return folder


def info(
    job: Any, trainer: Any, prepared: Prepared, stats: training.TrainStats, final: nn.Module, merge_diff, shares: list
) -> dict:
    """What the manifest records about a fine-tuning run (cost, schedule, checks); `shares`: how
    many test examples each process predicted."""
    metric = trainer.args.metric_for_best_model
    peak = peak_memory_mb()
    return {
        "method": job.config.method,
        "trainable_parameters": prepared.trainable_parameters,
        "total_parameters": parameter_counts(final)[1],
        "train_examples": len(prepared.train),
        "dev_examples": len(prepared.dev),
        "max_length": prepared.max_length,
        "epochs_run": round(float(trainer.state.epoch or 0.0), 4),
        "steps": trainer.state.global_step,
        f"best_dev_{metric}": trainer.state.best_metric,
        "evaluations": training.evaluations(trainer, metric),
        "train_time_s": round(stats.seconds, 3),
        "train_tokens": stats.tokens,
        "train_tokens_per_s": round(stats.tokens_per_s, 1),
        "resumed_from_step": stats.resumed_from_step,
        "peak_memory_mb": peak["cpu_rss"],  # since the cell started where the OS allows (manifest.peak_memory_mb)
        "peak_gpu_memory_mb": peak.get("gpu_allocated"),
        "merge_max_abs_diff": merge_diff,
        "test_examples_per_process": shares,
        "dtype": "bfloat16 autocast, float32 weights" if training.mixed_precision(job.model) else "float32",
        "device": "cpu" if training.uses_cpu(job.model.device) else "cuda",
        "base_model": prepared.loaded.identity,
    }


def export(model: nn.Module, tokenizer: Any, folder: Path) -> Path:
    """Save a plain transformers folder (no peft needed to load it), replacing any earlier one whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
