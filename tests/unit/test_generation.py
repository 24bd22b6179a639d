"""Generation against straightforward references, on a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers.tiny import build_tiny_model
from taskfit.config import ModelConfig
from taskfit.errors import TaskfitError
from taskfit.models import generation, slots
from taskfit.models.base import GenerationRequest
from taskfit.models.decoding import Detokenizer, draw, filter_logits, find_stop, nucleus, sample_seed
from taskfit.models.generation import STEP_ROWS, Generator
from taskfit.models.hf import HFLM

PROMPTS = ["Question: What does the fox do? Answer:", "Review: the food was cold.", "", "How would Jordan feel?"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    return HFLM.load(ModelConfig(name=str(folder), dtype="float32", device="cpu"))


def reference_greedy(lm: HFLM, context: str, max_new_tokens: int) -> list[int]:
    """Full forward over the whole sequence every step, argmax, stop at EOS."""
    ids = lm.generator.encode(context, max_new_tokens)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = lm.model(torch.tensor([ids + out])).logits[0, -1].argmax().item()
            if token == lm.tokenizer.eos_token_id:
                break
            out.append(token)
    return out


def sampled(context: str, seed: int, samples: int = 8, **kw) -> GenerationRequest:
    return GenerationRequest(context, max_new_tokens=12, temperature=1.0, samples=samples, seed=seed, **kw)


@pytest.mark.parametrize("context", PROMPTS)
def test_greedy_equals_reference_loop_and_hf_generate(lm, context):
    (gen,) = lm.generator.run(GenerationRequest(context, max_new_tokens=16))
    ref = reference_greedy(lm, context, 16)
    assert gen.tokens == ref
    assert gen.text == lm.tokenizer.decode(ref, skip_special_tokens=True)
    ids = torch.tensor([lm.generator.encode(context, 16)])
    with torch.inference_mode():
        hf = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=16,
            eos_token_id=lm.tokenizer.eos_token_id,
            pad_token_id=lm.tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
    assert [t for t in hf if t != lm.tokenizer.eos_token_id] == ref


def test_greedy_ignores_seed(lm):
    reqs = [GenerationRequest(PROMPTS[0], max_new_tokens=10, seed=s) for s in (0, 1, 2)]
    assert len({tuple(r[0] for r in lm.generate([q])) for q in reqs}) == 1


def test_same_seed_same_samples_whatever_the_batch(lm):
    a, b = sampled(PROMPTS[0], seed=3), sampled(PROMPTS[1], seed=3)
    first = lm.generate([a, b])
    assert lm.generate([a, b]) == first
    assert lm.generate([b, a])[::-1] == first
    assert lm.generate([a]) == first[:1]
    # a sample does not depend on how many others decode beside it
    assert lm.generate([a._replace(samples=3)])[0] == first[0][:3]


def test_different_seeds_give_different_samples(lm):
    one, two = lm.generate([sampled(PROMPTS[0], seed=0), sampled(PROMPTS[0], seed=1)])
    assert len(set(one)) > 1 and len(set(two)) > 1
    assert one != two
    # each sample has its own stream, from the seed, its index and the context text
    seeds = {sample_seed(s, i, c) for s in (0, 1) for i in (0, 1) for c in ("a", "b")}
    assert len(seeds) == 8 and sample_seed(0, 0, "a") == sample_seed(0, 0, "a")


def test_single_sample_with_temperature(lm):
    (out,) = lm.generate([sampled(PROMPTS[0], seed=5, samples=1)])
    assert len(out) == 1 and isinstance(out[0], str)


@pytest.mark.parametrize(
    "bad",
    [
        dict(samples=2),  # temperature 0
        dict(temperature=0.5, top_p=0.0),
        dict(temperature=0.5, top_p=1.5),
        dict(top_k=-1),
        dict(max_new_tokens=0),
        dict(temperature=-1.0),
        dict(stop=("",)),
    ],
)
def test_invalid_settings_raise(lm, bad):
    with pytest.raises(ValueError):
        lm.generate([GenerationRequest(PROMPTS[0], **bad)])


def test_stop_strings_cut_and_are_excluded(lm):
    full = lm.generator.run(GenerationRequest(PROMPTS[0], max_new_tokens=30))[0].text
    assert len(full) > 12
    early, late = full[6:8], full[9:12]
    assert full.find(late) > full.find(early) >= 0  # the tiny model's text is arbitrary; pick two stops
    (gen,) = lm.generator.run(GenerationRequest(PROMPTS[0], max_new_tokens=30, stop=(late, early)))
    assert gen.finish == "stop"
    assert gen.text == full[: full.find(early)]
    assert early not in gen.text
    assert len(gen.tokens) < 30  # decoding stopped there


def test_eos_stops(lm, monkeypatch):
    assert lm.tokenizer.eos_token_id in lm.generator.stop_ids
    tokens = lm.generator.run(GenerationRequest(PROMPTS[1], max_new_tokens=20))[0].tokens
    eos = tokens[5]  # pretend this token is EOS
    monkeypatch.setattr(lm.generator, "stop_ids", frozenset({eos}))
    (gen,) = lm.generator.run(GenerationRequest(PROMPTS[1], max_new_tokens=20))
    cut = tokens.index(eos)
    assert gen.finish == "eos" and gen.tokens == tokens[:cut]
    assert gen.text == lm.tokenizer.decode(tokens[:cut], skip_special_tokens=True)


@pytest.mark.parametrize("settings", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)])
def test_narrow_sampling_equals_greedy(lm, settings):
    greedy = lm.generate([GenerationRequest(PROMPTS[0], max_new_tokens=12)])[0][0]
    out = lm.generate([sampled(PROMPTS[0], seed=9, samples=4, **settings)])[0]
    assert out == [greedy] * 4


def test_prompt_runs_once_for_all_samples(lm):
    calls = []
    handle = lm.model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        outs = lm.generate([sampled(PROMPTS[0], seed=1, samples=8)])[0]
    finally:
        handle.remove()
    prompt_len = len(lm.generator.encode(PROMPTS[0], 12))
    assert len(outs) == 8
    assert calls[0] == (1, prompt_len)  # prefill at batch 1
    assert 1 + 1 <= len(calls) <= 1 + 12
    assert all(shape[1] == 1 and shape[0] <= 8 for shape in calls[1:])  # then one token per live sample


def input_shapes(generator: Generator, requests: list[GenerationRequest]) -> tuple[list, list]:
    """The outputs of a call, and the (rows, tokens) shape of each of its forward passes."""
    calls = []
    handle = generator.model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        return generator.run_all(requests), calls
    finally:
        handle.remove()


def test_finished_rows_free_their_slots(lm, monkeypatch):
    (full,) = lm.generator.run(GenerationRequest(PROMPTS[0], max_new_tokens=12))
    stop = lm.tokenizer.decode(full.tokens[:2], skip_special_tokens=True)[-1]
    early = sampled(PROMPTS[0], seed=2, stop=(stop,))
    late = GenerationRequest(PROMPTS[3], max_new_tokens=12)
    monkeypatch.setattr(Generator, "_alike_sizes", lambda self: STEP_ROWS[:1])  # steps of 8 rows only: 8 slots
    eight = Generator(lm.model, lm.tokenizer, lm.max_length)
    (gens, (alone,)), calls = input_shapes(eight, [early, late])
    assert sum(g.finish == "stop" for g in gens) >= 1  # a one-character stop string: some samples meet it early
    decode_steps = [shape for shape in calls if shape[1] == 1]
    assert set(decode_steps) == {(STEP_ROWS[0], 1)}
    # the ninth row (the late request) took the first freed slot: fewer steps than one request after the other
    assert len(decode_steps) < max(len(g.tokens) for g in gens) + len(alone.tokens)
    assert alone.tokens == lm.generator.run(late)[0].tokens


def test_a_step_runs_the_fewest_rows_that_hold_the_live_ones(lm, monkeypatch):
    """A call with more rows than the largest step fills that many slots; as rows finish and
    none wait, steps shrink to the next size that holds the rest."""
    monkeypatch.setattr(Generator, "_alike_sizes", lambda self: STEP_ROWS)
    fresh = Generator(lm.model, lm.tokenizer, lm.max_length)
    seen = []
    decode = Generator._decode

    def recording(self, tokens, live, rows, cache, check):
        seen.append((len(live), rows, cache.slots))
        return decode(self, tokens, live, rows, cache, check)

    monkeypatch.setattr(Generator, "_decode", recording)
    lengths = [(40, 2), (12, 4), (8, 6), (8, 8)]  # (samples, new tokens): 68 rows, finishing at four steps
    reqs = [sampled(PROMPTS[i % 2], seed=i, samples=n)._replace(max_new_tokens=t) for i, (n, t) in enumerate(lengths)]
    (_, calls) = input_shapes(fresh, reqs)
    assert [shape for shape in calls if shape[1] == 1] == [(rows, 1) for _, rows, _ in seen]
    assert all(slots == STEP_ROWS[-1] for _, _, slots in seen)
    assert all(rows == min(n for n in STEP_ROWS if n >= live) for live, rows, _ in seen)
    assert {rows for _, rows, _ in seen} == set(STEP_ROWS)  # rows finished at different steps
    (_, calls) = input_shapes(fresh, reqs[-1:])  # eight rows: eight slots
    assert seen[-1][2] == STEP_ROWS[0]


def test_step_sizes_are_used_only_where_rows_come_out_alike(lm):
    """A model whose logits for a row change with the rows beside it decodes in steps of the
    first size only; the check runs once per autocast state."""
    fresh = Generator(lm.model, lm.tokenizer, lm.max_length)
    assert fresh.step_rows() == STEP_ROWS[: len(fresh.step_rows())]
    probing, sizes, steps = decode_under_hook(  # a row's logits move with its place in the step
        lm, lambda mod, args, out: setattr(out, "logits", out.logits + torch.arange(out.logits.shape[0])[:, None, None])
    )
    assert sizes == STEP_ROWS[:1]
    assert steps == {(STEP_ROWS[0], 1)}
    assert probing.step_rows() == STEP_ROWS[:1]  # remembered, though the model behaves again
    with torch.autocast("cpu", torch.bfloat16):
        assert probing.step_rows() == fresh.step_rows()  # another state: checked afresh


def test_step_sizes_stop_before_the_first_that_changes_a_row(lm):
    """Rows that come out alike in steps of 8 and 16 rows but not of 32 decode in steps of 8 or
    16: the sizes below the first that fails stay, those from it on go."""
    big = STEP_ROWS[2]
    _, sizes, steps = decode_under_hook(
        lm, lambda mod, args, out: setattr(out, "logits", out.logits * 1.5) if out.logits.shape[0] == big else None
    )
    assert sizes == STEP_ROWS[:2]
    assert steps == {(n, 1) for n in STEP_ROWS[:2]}


def decode_under_hook(lm, hook) -> tuple[Generator, tuple[int, ...], set]:
    """A fresh generator decoding 40 samples while `hook` changes the model's output: the
    generator, the step sizes its probe allowed, and the shapes of its decoding steps."""
    handle = lm.model.register_forward_hook(hook)
    try:
        probing = Generator(lm.model, lm.tokenizer, lm.max_length)
        sizes = probing.step_rows()
        (_, calls) = input_shapes(probing, [sampled(PROMPTS[0], seed=1, samples=40)])
    finally:
        handle.remove()
    return probing, sizes, {shape for shape in calls if shape[1] == 1}


def test_slots_shrink_to_fit_their_memory(lm, monkeypatch):
    """A call gets the slots its rows need, fewer where their cache at the longest row would
    pass `SLOT_MEMORY`, and never fewer than the first step size."""
    g = Generator(lm.model, lm.tokenizer, lm.max_length)
    per_token = g._cache_bytes_per_token()
    with torch.no_grad():
        _, cache = g._forward(torch.tensor([[1, 2, 3]]), None)
    assert per_token == sum(t.numel() * t.element_size() for kv in slots.cache_layers(cache) for t in kv) // 3
    assert g._slot_count(3, 100, STEP_ROWS) == 8 and g._slot_count(9, 100, STEP_ROWS) == 16
    assert g._slot_count(100, 100, STEP_ROWS) == 64 and g._slot_count(100, 100, STEP_ROWS[:1]) == 8
    limit = generation.SLOT_MEMORY // (20 * per_token)  # 20 slots' worth
    assert g._slot_count(100, limit, STEP_ROWS) == 16
    assert g._slot_count(100, limit * 100, STEP_ROWS) == 8
    monkeypatch.setattr(lm.model, "config", SimpleNamespace(model_type="custom"))
    assert g._slot_count(100, 100, STEP_ROWS) == 8  # the cache's size is unknown


def recorded_logits(generator: Generator, requests: list[GenerationRequest], monkeypatch) -> dict:
    """Every logits row that picked a token: (request, sample, step) -> tensor."""
    seen = {}
    pick = Generator._pick

    def recording(self, logits, rows, req):
        for row, row_logits in zip(rows, logits):
            seen[(req, row.sample, row.steps)] = row_logits.clone()
        return pick(self, logits, rows, req)

    monkeypatch.setattr(Generator, "_pick", recording)
    generator.run_all(requests)
    monkeypatch.setattr(Generator, "_pick", pick)
    return seen


def test_a_rows_logits_do_not_depend_on_what_else_decodes(lm, monkeypatch):
    # greedy and sampled requests with prompts of different lengths: more rows than slots, so rows
    # wait, join freed slots at different steps and sit beside different neighbours
    reqs = [GenerationRequest(p, max_new_tokens=10) for p in PROMPTS]
    reqs += [sampled(PROMPTS[1], seed=4, samples=3), sampled(PROMPTS[3], seed=5, samples=60)]
    assert lm.generator.slots and sum(r.samples for r in reqs) > STEP_ROWS[-1]
    assert_rows_alike_alone_together_reversed(lm.generator, reqs, monkeypatch)


def assert_rows_alike_alone_together_reversed(generator: Generator, reqs: list, monkeypatch) -> None:
    """Every logits row of every step is exactly the same with the requests together, reversed
    and each alone."""
    together = recorded_logits(generator, reqs, monkeypatch)
    reordered = recorded_logits(generator, reqs[::-1], monkeypatch)
    alone = {}
    for req in reqs:
        alone.update(recorded_logits(generator, [req], monkeypatch))
    assert together.keys() == alone.keys() == reordered.keys()
    for key in together:
        assert torch.equal(together[key], alone[key]) and torch.equal(reordered[key], alone[key]), key


DEMOS = "Question: Is the sky blue? Answer: yes\n\nQuestion: Is fire cold? Answer: no\n\nQuestion: "
FEW_SHOT = [DEMOS + q for q in ("Do fish swim?", "Is ice hot? Think.", "Can a dog fly over the moon at night?")]


def forward_lengths(generator: Generator, requests: list[GenerationRequest]) -> list[int]:
    """The number of tokens each forward pass of a call ran (decode steps: 1)."""
    calls = []
    handle = generator.model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        generator.run_all(requests)
    finally:
        handle.remove()
    return calls


def few_shot(max_new_tokens: int = 10, **kw) -> list[GenerationRequest]:
    return [GenerationRequest(p, max_new_tokens, shared=len(DEMOS), **kw) for p in FEW_SHOT]


def test_a_shared_start_runs_once_per_run(lm):
    """The demonstrations every request names as shared run once (and not again for the next
    chunk); each prompt then runs its own tokens. Unnamed, the whole prompt runs."""
    head = len(lm.tokenizer(DEMOS, add_special_tokens=False).input_ids)
    prompts = [lm.generator.encode(p, 10) for p in FEW_SHOT]
    assert head >= 16 and all(p[:head] == prompts[0][:head] for p in prompts)
    fresh = Generator(lm.model, lm.tokenizer, lm.max_length)
    reqs = few_shot()
    assert [n for n in forward_lengths(fresh, reqs) if n > 1] == [head] + [len(p) - head for p in prompts]
    assert [n for n in forward_lengths(fresh, reqs[:2]) if n > 1] == [len(p) - head for p in prompts[:2]]
    plain = GenerationRequest(FEW_SHOT[0], 10)
    assert forward_lengths(fresh, [plain])[0] == len(prompts[0])
    # the split is the request's own: beside a prompt that shares nothing, alone, it is the same
    other = GenerationRequest(PROMPTS[0], 10)
    assert [n for n in forward_lengths(fresh, [reqs[2], other]) if n > 1] == [
        len(prompts[2]) - head,
        len(lm.generator.encode(PROMPTS[0], 10)),
    ]
    alone = Generator(lm.model, lm.tokenizer, lm.max_length)
    assert [n for n in forward_lengths(alone, [reqs[1]]) if n > 1] == [head, len(prompts[1]) - head]


def test_a_shared_start_keeps_every_row_independent_of_the_call(lm, monkeypatch):
    """Where a prompt splits is the request's own, so its rows compute the same bits alone,
    together and in any order; greedy still equals a full forward at every step."""
    reqs = few_shot() + [sampled(FEW_SHOT[1], seed=3, samples=3)._replace(shared=len(DEMOS))]
    assert_rows_alike_alone_together_reversed(lm.generator, reqs, monkeypatch)
    for req, (gen,) in zip(reqs, lm.generator.run_all(reqs[:3])):
        assert gen.tokens == reference_greedy(lm, req.context, 10)


def test_a_shared_start_splits_at_the_last_token_both_texts_have(lm):
    """The split falls after the last token the prompt has in common with its shared start
    tokenized alone (inside a word: before it); none when that is short, or when the prompt
    was cut from the left."""
    g = lm.generator
    whole = FEW_SHOT[0]
    ids = g.encode(whole, 10)
    head = lm.tokenizer(DEMOS, add_special_tokens=False).input_ids
    assert g._split(GenerationRequest(whole, 10, shared=len(DEMOS)), ids) == len(head)
    inside = DEMOS.index("cold") + 2  # "...Is fire co"
    n = g._split(GenerationRequest(whole, 10, shared=inside), ids)
    part = lm.tokenizer(DEMOS[:inside], add_special_tokens=False).input_ids
    assert 16 <= n < len(part) and ids[:n] == part[:n] and ids[n] != part[n]
    assert g._split(GenerationRequest(whole, 10, shared=len("Question: ")), ids) == 0  # under MIN_SHARED_PREFIX
    short = Generator(lm.model, lm.tokenizer, max_length=len(ids) + 4)
    cut = short.encode(whole, 10)
    assert short.truncated == 1 and short._split(GenerationRequest(whole, 10, shared=len(DEMOS)), cut) == 0


@pytest.mark.parametrize("architecture", ["llama", "cohere", "granite", "gemma2"])
def test_every_architecture_decodes_like_a_full_forward(tmp_path, architecture):
    folder = build_tiny_model(tmp_path / architecture, architecture=architecture)
    other = HFLM.load(ModelConfig(name=str(folder), dtype="float32", device="cpu"))
    # gemma2 has sliding-window layers and soft-capped attention: decoded one request at a time
    assert other.generator.slots == (architecture != "gemma2")
    for reqs in ([GenerationRequest(p, max_new_tokens=12) for p in PROMPTS], few_shot(12)):  # 2nd: shared start
        for req, (gen,) in zip(reqs, other.generator.run_all(reqs)):
            assert gen.tokens == reference_greedy(other, req.context, 12)


@pytest.mark.parametrize("fails", [True, False])
def test_attention_outside_the_interface_falls_back_to_one_request_at_a_time(tmp_path, monkeypatch, fails):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    folder = build_tiny_model(tmp_path / "own")
    other = HFLM.load(ModelConfig(name=str(folder), dtype="float32", device="cpu"))
    reqs = [GenerationRequest(p, max_new_tokens=8) for p in PROMPTS]
    expected = other.generate(reqs)

    def own_attention(module, query, key, value, attention_mask, **kwargs):
        """Attention that knows nothing of the slots, as a model with its own would: the slot
        layout makes it fail, or, where shapes happen to fit, compute something else."""
        if fails:
            return sdpa_attention_forward(module, query, key, value, None, **kwargs)
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    monkeypatch.setattr(generation, "register_row_attention", lambda: None)
    AttentionInterface.register(slots.ROW_ATTENTION, own_attention)
    try:
        fresh = Generator(other.model, other.tokenizer, other.max_length)
        assert fresh.slots
        assert fresh.generate(reqs) == expected
        assert not fresh.slots  # found out at the first step; the rest went one request at a time
    finally:
        AttentionInterface.register(slots.ROW_ATTENTION, slots.row_attention)


def test_long_prompt_is_cut_from_the_left(tmp_path):
    folder = build_tiny_model(tmp_path / "short", max_positions=32)
    lm = HFLM.load(ModelConfig(name=str(folder), dtype="float32", device="cpu"))
    long_ctx = "The quick brown fox jumps over the lazy dog. " * 10
    (texts,) = lm.generate([GenerationRequest(long_ctx, max_new_tokens=8)])
    assert lm.truncated == 1 and len(texts) == 1
    ids = lm.tokenizer(long_ctx, add_special_tokens=False).input_ids
    assert lm.generator.encode(long_ctx, 8) == ids[-24:]
    with pytest.raises(TaskfitError, match="prompt.max_new_tokens: 32 new tokens leave no room for the prompt"):
        lm.generate([GenerationRequest("x", max_new_tokens=32)])  # a user error, named, not a traceback


def test_incremental_text_equals_whole_decode(lm):
    # random tokens split UTF-8 characters across tokens: the hard case for incremental decoding
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        tokens = torch.randint(0, len(lm.tokenizer), (40,), generator=gen).tolist()
        detok = Detokenizer(lm.tokenizer)
        for t in tokens:
            detok.push(t)
        detok.flush()
        assert detok.text == lm.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_find_stop_looks_only_at_the_new_tail():
    assert find_stop("abc STOP", " STOP", ("STOP",)) == 4
    assert find_stop("abcST", "T", ("STOP", "ST")) == 3
    assert find_stop("xxSTyy", "yy", ("ST",)) == -1  # ended before the new piece: checked earlier
    assert find_stop("aXbY", "bY", ("Y", "Xb")) == 1  # the earliest start wins


def test_filter_logits_matches_definitions():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    kept = filter_logits(logits, 1.0, top_k=2, top_p=1.0).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    probs = logits.softmax(-1)[0]  # ~[0.61, 0.22, 0.14, 0.03]
    kept = filter_logits(logits, 1.0, top_k=0, top_p=0.7).isfinite()[0].tolist()
    assert kept == [True, True, False, False] and probs[0] < 0.7 < probs[:2].sum()
    assert filter_logits(logits, 0.5, 0, 1.0).equal(logits * 2)


def test_generator_works_without_hflm(lm):
    gen = Generator(lm.model, lm.tokenizer, max_length=512)
    assert gen.generate([GenerationRequest(PROMPTS[0], max_new_tokens=5)]) == lm.generate(
        [GenerationRequest(PROMPTS[0], max_new_tokens=5)]
    )


def test_nucleus_equals_full_sort():
    gen = torch.Generator().manual_seed(0)
    probs = (torch.randn(6, 500, generator=gen) * 2).softmax(-1)
    for top_p in (0.05, 0.5, 0.9, 0.999):
        sorted_p, order = probs.sort(-1, descending=True)
        ref = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (sorted_p.cumsum(-1) - sorted_p) < top_p)
        assert nucleus(probs, top_p, first_k=4).equal(ref)  # widened from 4 candidates
        assert nucleus(probs, top_p).equal(ref)


def test_draw_follows_the_probabilities():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]]).expand(4000, -1)
    rngs = [torch.Generator().manual_seed(i) for i in range(4000)]
    counts = torch.bincount(draw(probs, rngs), minlength=4).tolist()
    assert counts[1] == 0
    assert all(abs(c / 4000 - p) < 0.03 for c, p in zip(counts, [0.5, 0.0, 0.3, 0.2]))


def test_attention_arguments_the_rows_leave_out_fall_back(tmp_path, monkeypatch):
    # gemma2's layers hand their attention a sliding window and a soft cap; were the config check
    # to miss them, the first step finds out and the call decodes one request at a time
    folder = build_tiny_model(tmp_path / "gemma2", architecture="gemma2")
    monkeypatch.setattr(generation, "slots_usable", lambda model: True)
    other = HFLM.load(ModelConfig(name=str(folder), dtype="float32", device="cpu"))
    assert other.generator.slots
    reqs = [GenerationRequest(p, max_new_tokens=8) for p in PROMPTS]
    for req, (gen,) in zip(reqs, other.generator.run_all(reqs)):
        assert gen.tokens == reference_greedy(other, req.context, 8)
    assert not other.generator.slots and other.truncated == 0
