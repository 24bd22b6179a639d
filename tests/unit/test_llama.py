"""taskfit's own Llama model for scoring against transformers', on a tiny model: the same bits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from helpers.tiny import build_tiny_model
from taskfit.config import ModelConfig
from taskfit.models import hf, llama
from taskfit.models.base import GenerationRequest, Request
from taskfit.models.hf import HFLM
from taskfit.models.llama import LlamaForScoring, PlainTokenizer, llama_folder

DEMOS = "Question: What does the fox do? Answer: it jumps over the lazy dog.\n\n" * 3


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def mixed_requests() -> list[Request]:
    """Requests after a declared shared start (the demonstrations) and without one."""
    reqs = []
    for q in ["What does the fox do?", "How would Jordan feel?", "Who forgot the umbrella?"]:
        for a in ["it jumps over the lazy dog", "cold and annoyed", "great"]:
            reqs += [Request(f"{DEMOS}Question: {q}\nAnswer: ", a, len(DEMOS)), Request(f"Question: {q}\nAnswer:", a)]
    return reqs + [Request("", "The quick brown fox"), Request("Review: the food was cold. Sentiment:", " negative")]


def both(folder, monkeypatch, **model) -> tuple[HFLM, HFLM]:
    """The tiny model loaded on taskfit's own Llama and on transformers'."""
    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: True)  # dtype auto: bf16 autocast
    config = ModelConfig(name=str(folder), device="cpu", **model)
    return HFLM.load(config), HFLM.load(config, own_llama=False)


@pytest.mark.parametrize("dtype", ["float32", "auto", "bfloat16"])
def test_own_llama_scores_are_transformers_bits(tiny_folder, monkeypatch, dtype):
    own, theirs = both(tiny_folder, monkeypatch, dtype=dtype, recheck_margin=5.0, batch_tokens=64)
    assert isinstance(own.model, LlamaForScoring) and not isinstance(theirs.model, LlamaForScoring)
    reqs = mixed_requests()
    assert own.loglikelihood_greedy(reqs) == theirs.loglikelihood_greedy(reqs)
    assert own.loglikelihood_exact(reqs) == theirs.loglikelihood_exact(reqs)
    if dtype == "auto":
        assert own.rechecked == theirs.rechecked > 0  # the float32 recheck ran on both
    assert own.identity == theirs.identity  # one score cache for both


def test_own_llama_logits_and_prefix_caches_are_transformers_bits(tiny_folder, monkeypatch):
    own, theirs = both(tiny_folder, monkeypatch, dtype="auto")
    ids = torch.tensor([own.tokenizer(DEMOS, add_special_tokens=False).input_ids])
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            assert torch.equal(own.model(ids).logits, theirs.model(input_ids=ids).logits)
            mine = own.scorer.body(input_ids=ids, use_cache=True).cache
            other = theirs.scorer.body(input_ids=ids, use_cache=True).cache
        for a, b in zip(mine.layers, other.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert a.keys.stride() == b.keys.stride()


def test_plain_tokenizer_gives_transformers_ids(tiny_folder):
    from transformers import AutoTokenizer

    plain, theirs = PlainTokenizer(tiny_folder), AutoTokenizer.from_pretrained(tiny_folder)
    texts = ["Question: the fox?\nAnswer:", " it jumps", "  two  spaces\n\n\ttab ", "", "café 東京 <|im_end|> end"]
    assert plain(texts, add_special_tokens=False).input_ids == theirs(texts, add_special_tokens=False).input_ids
    assert plain(texts[0], add_special_tokens=False).input_ids == theirs(texts[0], add_special_tokens=False).input_ids
    assert (plain.bos_token_id, plain.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert plain.chat_template == theirs.chat_template
    messages = [{"role": "user", "content": "Is it red?"}]
    assert plain.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    ids = theirs(texts[4], add_special_tokens=False).input_ids
    assert plain.decode(ids) == theirs.decode(ids)  # what it does not do itself goes to transformers'
    assert plain("hi").input_ids == theirs("hi").input_ids


def _edited(folder, tmp_path, file: str, **changes):
    copy = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, copy)
    data = json.loads((copy / file).read_text())
    data.update(changes)
    (copy / file).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    "file, changes",
    [
        ("config.json", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
        ("config.json", {"attention_bias": True}),
        ("config.json", {"mlp_bias": True}),
        ("config.json", {"hidden_act": "gelu"}),
        ("config.json", {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}),
        ("config.json", {"quantization_config": {"quant_method": "bitsandbytes"}}),
        ("tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"}),
        ("tokenizer_config.json", {"split_special_tokens": True}),  # transformers splits "<|im_end|>" in text
        ("config.json", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),  # wins over rope_parameters
        ("config.json", {"rope_parameters": {"type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
        ("config.json", {"head_dim": "16"}),  # transformers refuses it; so does the own model
        ("config.json", {"rope_parameters": {"rope_type": "default", "rope_theta": "10000"}}),
    ],
)
def test_only_plain_llama_checkpoints_score_on_the_own_model(tiny_folder, tmp_path, file, changes):
    assert llama_folder(tiny_folder) is not None
    assert llama_folder(_edited(tiny_folder, tmp_path, file, **changes)) is None


def test_a_folder_without_tokenizer_json_or_weights_is_left_to_transformers(tiny_folder, tmp_path):
    for missing in ("tokenizer.json", "model.safetensors"):
        copy = tmp_path / missing
        shutil.copytree(tiny_folder, copy)
        (copy / missing).unlink()
        assert llama_folder(copy) is None


def test_sharded_weights_load_as_one(tiny_folder, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_folder).save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_folder).save_pretrained(sharded)
    assert not (sharded / "model.safetensors").exists() and (sharded / "model.safetensors.index.json").exists()
    own, theirs = both(sharded, monkeypatch, dtype="float32")
    assert isinstance(own.model, LlamaForScoring)
    assert own.loglikelihood(mixed_requests()) == theirs.loglikelihood(mixed_requests())


def test_weights_the_own_model_cannot_read_load_on_transformers(tiny_folder, monkeypatch):
    def unreadable(*_args):
        raise ValueError("not a Llama checkpoint's weights")

    monkeypatch.setattr(hf, "load_llama", unreadable)
    lm = HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", dtype="float32"))
    assert not isinstance(lm.model, LlamaForScoring) and lm.loglikelihood(mixed_requests()[:2])


def test_generating_switches_to_transformers_with_the_same_scores(tiny_folder):
    lm = HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", dtype="float32"))
    reqs = mixed_requests()
    before = lm.loglikelihood(reqs)
    tokens = lm.scorer.tokens
    assert isinstance(lm.model, LlamaForScoring) and tokens > 0
    (texts,) = lm.generate([GenerationRequest("Question: What does the fox do?\nAnswer:", max_new_tokens=4)])
    assert texts and not isinstance(lm.model, LlamaForScoring)
    assert lm.generator.model is lm.model and lm.scorer.model is lm.model
    assert lm.loglikelihood(reqs) == before
    assert lm.scorer.tokens > tokens  # counted on from where the own model left off


def test_a_scoring_run_never_imports_transformers_model_code(tiny_folder):
    """The point of the own model: a process that only scores a Llama checkpoint does not import
    transformers' model code (torch._dynamo, torch.distributed, scipy.optimize come with it)."""
    code = f"""
import sys
from taskfit.config import ModelConfig
from taskfit.models import load_model
from taskfit.models.base import Request
lm = load_model(ModelConfig(name={str(tiny_folder)!r}, device="cpu", dtype="float32"))
assert lm.loglikelihood([Request("Question: the fox?\\nAnswer:", " it jumps")])[0] < 0
print(sorted(m for m in ("transformers.modeling_utils", "torch._dynamo", "scipy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_load_llama_names_what_does_not_match(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "renamed"
    shutil.copytree(tiny_folder, copy)
    weights = load_file(copy / "model.safetensors")
    weights["model.norm.scale"] = weights.pop("model.norm.weight")
    save_file(weights, copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\], unexpected \['model.norm.scale'\]"):
        llama.load_llama(copy, llama_folder(copy), torch.float32)


def test_every_layer_of_the_own_model_attends_through_the_buckets(tiny_folder, monkeypatch):
    from taskfit.models import attention

    plans = []
    real = attention._Buckets
    monkeypatch.setattr(attention, "_Buckets", lambda *args: plans.append(real(*args)) or plans[-1])
    lm = HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", dtype="float32"))
    lm.loglikelihood(mixed_requests())
    layers = llama_folder(tiny_folder).num_hidden_layers
    assert plans and all(p.calls == layers for p in plans)


def test_start_and_end_tokens_are_read_where_older_transformers_saved_them(tiny_folder, tmp_path):
    from transformers import AutoTokenizer

    older = tmp_path / "older"
    shutil.copytree(tiny_folder, older)
    config = json.loads((older / "tokenizer_config.json").read_text())
    special = {key: config.pop(key) for key in ("bos_token", "eos_token")}
    (older / "tokenizer_config.json").write_text(json.dumps(config))
    (older / "special_tokens_map.json").write_text(json.dumps(special))
    plain, theirs = PlainTokenizer(older), AutoTokenizer.from_pretrained(older)
    assert llama_folder(older) is not None
    assert (plain.bos_token_id, plain.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id) != (None, None)
    (older / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    (older / "tokenizer_config.json").write_text(json.dumps({**config, **special}))
    assert llama_folder(older) is None  # the two files disagree: transformers decides


def test_transformers_model_code_loads_with_the_collector_paused_and_joins_a_frozen_load(tiny_folder):
    import gc

    from taskfit.models import frozen_load

    seen = []
    with frozen_load(lambda: HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", dtype="float32"))) as lm:
        full = lm._full
        lm._full = lambda: seen.append((gc.isenabled(), gc.get_freeze_count())) or full()
        frozen = gc.get_freeze_count()
        assert lm.generator and not isinstance(lm.model, LlamaForScoring)
        assert seen == [(False, frozen)] and gc.get_freeze_count() > frozen
    assert gc.isenabled()


def test_an_untied_output_layer_loads_its_own_weights(tiny_folder, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    untied = tmp_path / "untied"
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    model.save_pretrained(untied)
    AutoTokenizer.from_pretrained(tiny_folder).save_pretrained(untied)
    own, theirs = both(untied, monkeypatch, dtype="float32")
    assert (
        isinstance(own.model, LlamaForScoring) and own.model.lm_head.weight is not own.model.model.embed_tokens.weight
    )
    assert not torch.equal(own.model.lm_head.weight, own.model.model.embed_tokens.weight)
    assert own.loglikelihood(mixed_requests()) == theirs.loglikelihood(mixed_requests())


def test_an_output_layer_stored_apart_from_tied_embeddings_loads_on_transformers(tiny_folder, tmp_path, monkeypatch):
    """transformers keeps a stored head that differs from the embeddings it is said to be tied to."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "stored-head"
    shutil.copytree(tiny_folder, copy)
    weights = load_file(copy / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] * 0.5
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    own, theirs = both(copy, monkeypatch, dtype="float32")
    assert not isinstance(own.model, LlamaForScoring)
    assert own.loglikelihood(mixed_requests()) == theirs.loglikelihood(mixed_requests())


def test_tokens_named_in_the_config_but_not_in_tokenizer_json_leave_the_folder_to_transformers(tiny_folder, tmp_path):
    copy = _edited(tiny_folder, tmp_path, "tokenizer_config.json", additional_special_tokens=["<|tool|>"])
    with pytest.raises(ValueError, match="<|tool|>"):
        PlainTokenizer(copy)
    lm = HFLM.load(ModelConfig(name=str(copy), device="cpu", dtype="float32"))
    assert not isinstance(lm.model, LlamaForScoring)
