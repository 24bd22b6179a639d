"""The tree-shaped scorer against the straightforward computation, on a tiny model."""

from __future__ import annotations

import re

import pytest
import torch

from helpers.tiny import build_tiny_model
from taskfit.config import ModelConfig
from taskfit.models import attention, scoring
from taskfit.models.attention import tree_mask
from taskfit.models.base import GenerationRequest, Request
from taskfit.models.hf import HFLM, encode_pairs
from taskfit.models.scoring import MIN_SHARED_PREFIX, Group, build_row, shared_prefix_length

DEMOS = "Question: What does the fox do? Answer: it jumps over the lazy dog.\n\n" * 3


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def lm(tiny_folder):
    return HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def hf_lm(tiny_folder):
    """On transformers' model (the tiny Llama otherwise scores on taskfit's own, see `llama`)."""
    return HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"), own_llama=False)


def naive(lm: HFLM, req: Request) -> tuple[float, bool]:
    """One full forward over context+continuation, log-softmax over every position."""
    ctx, cont = lm._encode_pair(req.context, req.continuation)
    with torch.inference_mode():
        logprobs = lm.model(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
    picked = [logprobs[len(ctx) - 1 + i] for i in range(len(cont))]
    return sum(p[t].item() for p, t in zip(picked, cont)), all(p.argmax().item() == t for p, t in zip(picked, cont))


def requests() -> list[Request]:
    reqs = []
    for q in ["What does the fox do?", "How would Jordan feel?", "Who forgot the umbrella?"]:
        ctx = f"Question: {q}\nAnswer: "
        reqs += [Request(ctx, c) for c in ["it jumps over the lazy dog", "cold and annoyed", "great", "bad"]]
    reqs += [Request("The food was cold. All in all, it was ", w + ".") for w in ["great", "terrible", "okay"]]
    return reqs


def test_tree_scores_equal_full_forward(lm):
    reqs = requests()
    got = lm.loglikelihood_greedy(reqs)
    for req, (lp, greedy) in zip(reqs, got):
        ref_lp, ref_greedy = naive(lm, req)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy


def test_shared_demo_prefix_is_cached_and_exact(lm):
    reqs = [Request(DEMOS + r.context, r.continuation, len(DEMOS)) for r in requests()[:8]]
    groups = [Group(*lm._encode_pair(r.context, r.continuation)) for r in reqs[::4]]
    assert shared_prefix_length([Group(g.context, [g.continuations]) for g in groups]) >= MIN_SHARED_PREFIX
    got = lm.loglikelihood(reqs)
    for req, lp in zip(reqs, got):
        assert lp == pytest.approx(naive(lm, req)[0], abs=1e-4)


def mixed_requests() -> list[Request]:
    """Groups with and without the shared demonstrations, several continuation lengths."""
    return requests() + [Request(DEMOS + r.context, r.continuation, len(DEMOS)) for r in requests()]


@pytest.mark.parametrize("batch_tokens", [1, 5, 33, 64, 300])
@pytest.mark.parametrize("with_demos", [False, True])
def test_scores_do_not_depend_on_batch_size(lm, tiny_folder, batch_tokens, with_demos):
    reqs = mixed_requests() if with_demos else requests()
    reference = lm.loglikelihood(reqs)
    other = HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu", batch_tokens=batch_tokens))
    assert other.loglikelihood(reqs) == reference  # exactly: rows never interact, the head's blocks are fixed


def test_scores_do_not_depend_on_request_order_or_repeats(lm):
    reqs = mixed_requests()
    forward = lm.loglikelihood(reqs)
    assert lm.loglikelihood(reqs[::-1])[::-1] == forward  # exactly: groups are laid out in a canonical order
    shuffled = reqs[7:] + reqs[:7] + reqs[:3]
    assert lm.loglikelihood(shuffled) == forward[7:] + forward[:7] + forward[:3]


def test_trailing_space_moves_into_continuation(lm):
    ctx, cont = lm._encode_pair("Answer: ", "great")
    ctx2, cont2 = lm._encode_pair("Answer:", " great")
    assert (ctx, cont) == (ctx2, cont2)
    assert lm.tokenizer.decode(cont) == " great"


def test_empty_context_scores_after_the_bos_token(lm):
    ctx, cont = lm._encode_pair("", "great")
    assert ctx == [lm.tokenizer.bos_token_id]
    assert lm.loglikelihood([Request("", "great")])[0] == pytest.approx(naive(lm, Request("", "great"))[0], abs=1e-4)


def test_long_context_is_cut_from_the_left(tmp_path):
    folder = build_tiny_model(tmp_path / "short", max_positions=32)
    lm = HFLM.load(ModelConfig(name=str(folder), dtype="float32", device="cpu"))
    long_ctx = "The quick brown fox jumps over the lazy dog. " * 10 + "Answer:"
    lp = lm.loglikelihood([Request(long_ctx, " great")])[0]
    assert lm.truncated == 1
    ctx, cont = lm._encode_pair(long_ctx, " great")
    kept = ctx[len(ctx) + len(cont) - 1 - 32 :]
    with torch.inference_mode():
        logprobs = lm.model(torch.tensor([kept + cont])).logits.log_softmax(-1)[0]
    ref = sum(logprobs[len(kept) - 1 + i, t].item() for i, t in enumerate(cont))
    assert lp == pytest.approx(ref, abs=1e-4)


def test_tree_mask_hides_sibling_continuations():
    row = build_row(0, Group([5, 6, 7], [[1, 2, 3], [4, 5]]), offset=0)
    # context 3 tokens, then cont 0 feeds 2 tokens, cont 1 feeds 1 token (last tokens are only targets)
    assert row.owner == [-1, -1, -1, 0, 0, 1]
    assert row.positions == [0, 1, 2, 3, 4, 3]
    mask = tree_mask(torch.tensor([row.owner]), torch.tensor([6]))[0]
    assert mask[5, :3].all() and not mask[5, 3:5].any() and mask[5, 5]
    assert mask[4, 3] and not mask[3, 4]
    # In a batch, a shorter row keeps its own mask and never sees its padding; each padding
    # query sees exactly one key (so it stays finite).
    short = build_row(1, Group([5, 6], [[1, 2]]), offset=0)  # 3 tokens
    padded = short.owner + [-2] * 3
    batch = tree_mask(torch.tensor([row.owner, padded]), torch.tensor([6, 3]))
    assert torch.equal(batch[0], mask)
    assert torch.equal(batch[1, :3, :3], tree_mask(torch.tensor([short.owner]), torch.tensor([3]))[0])
    assert not batch[1, :3, 3:].any() and batch[1, 3:].sum(-1).tolist() == [1, 1, 1]
    # targets: cont 0 token 1 predicted at the last context position, then at its own tokens
    assert row.targets[:3] == [(0, 2, 1), (0, 3, 2), (0, 4, 3)]
    assert row.targets[3:] == [(1, 2, 4), (1, 5, 5)]


def test_chat_wraps_prompt_as_user_turn(lm):
    text = lm.chat("Is it good?")
    assert text.startswith("<|im_start|>user\nIs it good?") and text.endswith("<|im_start|>assistant\n")


def test_auto_precision_per_device(monkeypatch):
    """`auto`: float32 weights under bf16 autocast on a CPU with native bf16, float32 on others."""
    from taskfit.models import hf

    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: True)
    auto = hf.pick_precision("auto", "cpu")
    assert (auto.weights, auto.compute) == (torch.float32, torch.bfloat16)
    assert auto.name == "bfloat16 autocast, float32 weights"
    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: False)
    assert hf.pick_precision("auto", "cpu").name == "float32"
    assert hf.pick_precision("bfloat16", "cpu").name == "bfloat16"
    assert hf.pick_precision("float32", "cpu").name == "float32"


def test_autocast_scores_close_to_float32_and_keep_float32_weights(tiny_folder, lm, monkeypatch):
    from taskfit.models import hf

    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: True)
    mixed = HFLM.load(ModelConfig(name=str(tiny_folder), dtype="auto", device="cpu"))
    assert mixed.model.dtype == torch.float32 and mixed.identity["dtype"] == "bfloat16 autocast, float32 weights"
    exact = lm.loglikelihood(requests())
    rounded = mixed.loglikelihood(requests())
    assert rounded != exact  # the products did run in bf16
    assert rounded == pytest.approx(exact, rel=0.01)
    # other batch layouts round differently in bf16; exact order-independence is a float32 promise
    assert mixed.loglikelihood(list(reversed(requests()))) == pytest.approx(list(reversed(rounded)), rel=0.01)


def test_batches_cover_every_row_once_within_the_budget_and_pad_little():
    """The batch plan: every row once, longest first, under `batch_tokens` (a longer row alone),
    and cheaper (padded tokens + per-batch overhead) than cutting greedily at `batch_tokens`."""
    import random

    from taskfit.models.scoring import BATCH_OVERHEAD, TreeScorer, _Row

    rng = random.Random(0)
    rows = [_Row(i, [1] * rng.randint(5, 120), [], [], []) for i in range(150)] + [_Row(150, [1] * 700, [], [], [])]
    scorer = object.__new__(TreeScorer)
    scorer.batch_tokens = 600
    batches = scorer._batches(rows)
    assert sorted(r.group for b in batches for r in b) == list(range(151))
    padded = 0
    for batch in batches:
        longest = max(len(r.tokens) for r in batch)
        assert len(batch[0].tokens) == longest
        assert longest * len(batch) <= scorer.batch_tokens or len(batch) == 1
        padded += longest * len(batch)
    greedy, batch, count = 0, [], 1
    for row in sorted(rows, key=lambda r: -len(r.tokens)):
        if batch and len(batch[0].tokens) * (len(batch) + 1) > scorer.batch_tokens:
            greedy, batch, count = greedy + len(batch[0].tokens) * len(batch), [], count + 1
        batch.append(row)
    greedy += len(batch[0].tokens) * len(batch)
    assert padded + BATCH_OVERHEAD * len(batches) < greedy + BATCH_OVERHEAD * count


def test_close_calls_are_rechecked_in_float32(tiny_folder, lm, monkeypatch):
    """Under bf16 autocast, a group whose two best continuations are within `recheck_margin` is
    scored again in float32: with a huge margin every group is, and the scores are float32's."""
    from taskfit.models import hf

    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: True)
    exact = lm.loglikelihood(requests())
    groups = len({r.context for r in requests()})
    always = HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", recheck_margin=1e9))
    assert always.loglikelihood(requests()) == exact and always.rechecked == groups
    assert always.identity["recheck_margin"] == 1e9  # part of the score cache's key
    never = HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", recheck_margin=0))
    assert never.loglikelihood(requests()) != exact and never.rechecked == 0
    gaps = [
        hf._top_gap([(lp, True) for lp, r in zip(exact, requests()) if r.context == c])
        for c in {r.context for r in requests()}
    ]
    some = HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", recheck_margin=sorted(gaps)[1] + 1e-3))
    some.loglikelihood(requests())
    assert 1 <= some.rechecked < groups


def test_a_recheck_lays_out_its_groups_as_the_float32_pass_would(tiny_folder, lm, monkeypatch):
    """A single close group of a call with shared demos is rechecked with the call's cached
    prefix: its scores are exactly those of the whole call scored in float32."""
    from taskfit.models import hf

    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: True)
    reqs = [Request(DEMOS + r.context, r.continuation, len(DEMOS)) for r in requests()]
    exact = lm.loglikelihood(reqs)
    never = HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", recheck_margin=0))
    rounded = never.loglikelihood(reqs)
    contexts = sorted({r.context for r in reqs})
    gaps = sorted((hf._top_gap([(lp, True) for lp, r in zip(rounded, reqs) if r.context == c]), c) for c in contexts)
    one = HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", recheck_margin=(gaps[0][0] + gaps[1][0]) / 2))
    got = one.loglikelihood(reqs)
    assert one.rechecked == 1
    close = [i for i, r in enumerate(reqs) if r.context == gaps[0][1]]
    assert [got[i] for i in close] == [exact[i] for i in close]


@pytest.mark.parametrize("enabled", [True, False])
def test_model_loading_pauses_the_collector_and_restores_it(enabled, tiny_folder, monkeypatch):
    import gc

    from taskfit.models import load_model, paused_collector

    seen, original = [], HFLM.load
    monkeypatch.setattr(HFLM, "load", lambda config: seen.append(gc.isenabled()) or original(config))
    (gc.enable if enabled else gc.disable)()
    try:
        load_model(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"))
        assert seen == [False] and gc.isenabled() is enabled
        with pytest.raises(ValueError), paused_collector():
            raise ValueError("a failed load")
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


class _Cyclic:
    """Stands for a loaded model: freed only by the cyclic collector."""

    def __init__(self):
        self.me = self


@pytest.mark.parametrize("frozen_before", [False, True])
def test_a_loaded_model_stays_out_of_the_collectors_walks_until_released(frozen_before):
    import gc
    import weakref

    from taskfit.models import frozen_load

    gc.collect()
    gc.unfreeze()
    if frozen_before:
        gc.freeze()
    before = gc.get_freeze_count()
    seen = []
    try:
        with frozen_load(lambda: seen.append(gc.isenabled()) or _Cyclic()) as lm:
            assert seen == [False] and gc.isenabled()  # loaded with the collector paused, then on again
            assert gc.get_freeze_count() > before
            assert not any(o is lm for o in gc.get_objects())  # among the frozen objects: never walked
            ref = weakref.ref(lm)
        # after: the model is collectable again, unless something had frozen objects before
        assert (gc.get_freeze_count() == 0) is (not frozen_before)
        assert any(o is lm for o in gc.get_objects()) is (not frozen_before)
        del lm
        gc.collect()
        assert (ref() is None) is (not frozen_before)
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("architecture", ["gemma2", "cohere", "granite"])
def test_architectures_that_change_their_logits_score_as_their_own_forward(architecture, tmp_path):
    """Gemma 2 soft-caps, Cohere and Granite scale the head's logits: the scorer (body + head)
    must apply the same, with and without a shared demonstration prefix."""
    folder = build_tiny_model(tmp_path / architecture, architecture=architecture)
    lm = HFLM.load(ModelConfig(name=str(folder), dtype="float32", device="cpu"))
    reqs = requests()[:4] + [Request(DEMOS + r.context, r.continuation, len(DEMOS)) for r in requests()[4:8]]
    for req, (lp, greedy) in zip(reqs, lm.loglikelihood_greedy(reqs)):
        ref_lp, ref_greedy = naive(lm, req)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy


def test_an_output_layer_the_scorer_cannot_reproduce_is_refused_before_any_score(tmp_path, monkeypatch):
    """The check runs at the first scores, in their session (a model that only generates skips
    it), and refuses an output layer the scorer does not reproduce before any score is made."""
    from taskfit import TaskfitError

    folder = build_tiny_model(tmp_path / "granite", architecture="granite")
    monkeypatch.setattr(scoring, "output_transform", lambda model: lambda logits: logits)  # as if unknown
    lm = HFLM.load(ModelConfig(name=str(folder), dtype="float32", device="cpu"))
    scored = []
    monkeypatch.setattr(lm.scorer, "score", lambda *a, **k: scored.append(a))
    assert lm.generate([GenerationRequest("Q: 2+2?\nA:", max_new_tokens=2)])  # generating needs no check
    with pytest.raises(TaskfitError, match=f"model.name: {re.escape(str(folder))} .*changes its output logits"):
        lm.loglikelihood(requests()[:2])
    assert not scored


def test_the_output_layer_is_checked_once(tiny_folder, monkeypatch):
    lm = HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"))
    checks = []
    real = lm.scorer.check_output_layer
    monkeypatch.setattr(lm.scorer, "check_output_layer", lambda name: checks.append(name) or real(name))
    lm.loglikelihood(requests()[:2])
    lm.loglikelihood_exact(requests()[2:4])
    assert checks == [str(tiny_folder)]
    bodies = []  # the check compares the head on the body's output inside the model's own forward: one pass
    lm.scorer.body.register_forward_hook(lambda *_: bodies.append(1))
    real(str(tiny_folder))
    assert bodies == [1]


def test_shared_prefix_is_computed_once_across_calls_per_autocast_state(tiny_folder):
    """Chunks of a run with fixed demonstrations share one prefix: its cache is kept between
    calls, one per autocast state (bf16 scores never reuse a float32 prefix, nor the reverse),
    and a kept prefix gives exactly the scores of a fresh one."""
    reqs = [Request(DEMOS + r.context, r.continuation, len(DEMOS)) for r in requests()[:12]]  # 3 questions, one prefix
    fresh = HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"))
    lm = HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"))
    groups = [Group(*lm._encode_pair(r.context, r.continuation)) for r in reqs]
    groups = [Group(g.context, [g.continuations]) for g in groups]
    prefix = shared_prefix_length(groups)
    assert prefix >= len(lm.tokenizer(DEMOS, add_special_tokens=False).input_ids)

    def computed(scorer, part, bf16=False):
        before = scorer.tokens
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            scores = scorer.score(part)
        return scores, scorer.tokens - before

    reference, _ = computed(fresh.scorer, groups)
    _, cost = computed(lm.scorer, groups[:8], bf16=True)
    assert cost == prefix + sum(len(build_row(0, g, prefix).tokens) for g in groups[:8])
    scores, cost = computed(lm.scorer, groups[:8])  # float32: its own prefix, computed once
    assert scores == reference[:8] and cost == prefix + sum(len(build_row(0, g, prefix).tokens) for g in groups[:8])
    scores, cost = computed(lm.scorer, groups[4:])  # the same prefix again: kept
    assert scores == reference[4:] and cost == sum(len(build_row(0, g, prefix).tokens) for g in groups[4:])


def test_requests_are_encoded_together_exactly_as_one_by_one(lm):
    """One tokenizer call for all distinct texts gives lm-eval's pair split, request by request."""

    def encode(text: str) -> list[int]:
        return lm.tokenizer(text, add_special_tokens=False).input_ids

    def one_by_one(req: Request, joint: bool = True) -> tuple[list[int], list[int]]:
        stripped = req.context.rstrip(" ")
        continuation = req.context[len(stripped) :] + req.continuation
        if not stripped:
            return [lm.tokenizer.bos_token_id], encode(continuation)
        ctx = encode(stripped)
        return ctx, encode(stripped + continuation)[len(ctx) :] if joint else encode(continuation)

    reqs = [*mixed_requests(), Request("", "great"), Request("Answer: ", "great"), Request("Answer:", " great")]
    reqs += [Request("Answer: the la", "zy dog")]  # a word cut in two: the two splits differ
    reqs += reqs[:3]  # repeated requests
    assert lm._encode_pairs(reqs) == [one_by_one(r) for r in reqs]
    # Fine-tuning's generation recipe encodes each answer alone (as greedy decoding emits it).
    apart = encode_pairs(lm.tokenizer, [(r.context, r.continuation) for r in reqs], joint=False)
    assert apart == [one_by_one(r, joint=False) for r in reqs]
    cut = reqs.index(Request("Answer: the la", "zy dog"))
    assert apart[cut][1] != lm._encode_pairs(reqs)[cut][1]


def test_a_score_does_not_depend_on_what_else_is_scored(lm):
    """Where a row's cached prefix ends is its request's declared shared start: an example's
    options score the same bits alone, beside other examples, beside another template's
    examples or requests that declare nothing; without the declaration, the whole context runs
    in the row."""
    reqs = [Request(DEMOS + r.context, r.continuation, len(DEMOS)) for r in requests()]
    other = [Request(DEMOS.upper() + r.context, r.continuation, len(DEMOS)) for r in requests()[:4]]
    together = lm.loglikelihood(reqs)
    examples = [reqs[i : i + 4] for i in range(0, 12, 4)] + [reqs[12:]]  # one context each, all its options
    assert [lp for ex in examples for lp in lm.loglikelihood(ex)] == together
    assert lm.loglikelihood(reqs[4:8] + other + requests())[:4] == together[4:8]
    before = lm.scorer.tokens
    plain = lm.loglikelihood([r._replace(shared=0) for r in reqs[:12]])  # three examples
    assert lm.scorer.tokens - before >= 3 * len(lm.tokenizer(DEMOS, add_special_tokens=False).input_ids)
    assert plain == pytest.approx(together[:12], abs=1e-4)


def test_templates_scored_together_share_each_templates_demos(tiny_folder, monkeypatch):
    """An ensemble's call holds every template's requests: each template's demonstrations run
    once (and are kept for the next call), the three in one batch, the templates' rows in the
    same batches, each after its own template's demonstrations, and every score is what the
    template's requests scored alone would give."""
    templates = [DEMOS, DEMOS.replace("Question", "Q").replace("Answer", "A"), DEMOS.upper()]
    reqs = [Request(d + r.context, r.continuation, len(d)) for d in templates for r in requests()[:12]]
    lm = HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"))
    alone = [lp for t in range(3) for lp in lm.loglikelihood(reqs[12 * t : 12 * (t + 1)])]
    fresh = HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"))
    batches = []
    real_forward = fresh.scorer._forward

    def forward(batch, prefixes, use_cache=False):
        batches.append((use_cache, len(batch), len({id(kv) for kv in prefixes})))
        return real_forward(batch, prefixes, use_cache)

    monkeypatch.setattr(fresh.scorer, "_forward", forward)
    monkeypatch.setattr(scoring, "BATCH_OVERHEAD", 10_000)  # batches as large as allowed, whatever their padding
    assert fresh.loglikelihood(reqs) == alone
    assert batches[0] == (True, 3, 1)  # the three templates' demonstrations in one batch
    assert max(n for cache, _, n in batches if not cache) == 3  # a batch with every template's rows
    assert fresh.scorer.tokens == lm.scorer.tokens  # each template's demonstrations once, as alone
    heads = [len(fresh.tokenizer(d, add_special_tokens=False).input_ids) for d in templates]
    assert fresh.scorer.tokens < sum(len(fresh._encode_pair(r.context, "")[0]) for r in reqs[::4])
    first = fresh.scorer.tokens
    assert fresh.loglikelihood(reqs) == alone  # the next chunk of the run, say
    # the three prefixes were kept: not computed again (each is its demonstrations, give or take
    # the separator's last token)
    assert first - (fresh.scorer.tokens - first) >= sum(heads) - 2 * len(heads)
    for req, lp in zip(reqs, alone):
        assert lp == pytest.approx(naive(lm, req)[0], abs=1e-4)
    # prefixes held in smaller waves (one template's at a time): the same scores
    monkeypatch.setattr(scoring, "PREFIX_TOKENS_KEPT", min(heads) + 1)
    waves = HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"))
    assert len(list(waves.scorer._waves(declared_starts(waves, reqs)))) == 3
    assert waves.loglikelihood(reqs) == alone


def declared_starts(lm: HFLM, reqs: list[Request]) -> list[tuple[int, ...]]:
    """The tokens of each request's declared shared start (`_waves`'s input)."""
    pairs = lm._encode_pairs(reqs)
    return [tuple(ctx[: lm.starts.length(r.context, r.shared, ctx)]) for r, (ctx, _) in zip(reqs, pairs)]


def test_prefixes_reach_attention_per_span_and_through_a_cache_without_buckets(tiny_folder, monkeypatch):
    """Through the buckets (sdpa), a batch runs without a cache: each span's prefix keys are put
    before its rows' own there (no copy of every prefix for the whole batch). An attention the
    buckets cannot run (eager) gets the rows' prefixes in a cache, padded to the longest and
    masked: the same scores within float32 rounding."""
    templates = [DEMOS, DEMOS.replace("Question", "Q").replace("Answer", "A")]
    reqs = [Request(d + r.context, r.continuation, len(d)) for d in templates for r in requests()[:8]]
    reqs += requests()[8:12]  # and rows without a prefix
    lm = HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"), own_llama=False)
    caches = []
    real_cache = scoring.batch_cache
    monkeypatch.setattr(scoring, "batch_cache", lambda *a: caches.append(a) or real_cache(*a))
    monkeypatch.setattr(scoring, "BATCH_OVERHEAD", 10_000)  # every row in one batch
    bucketed = lm.loglikelihood(reqs)
    assert caches == []
    eager = HFLM.load(ModelConfig(name=str(tiny_folder), dtype="float32", device="cpu"), own_llama=False)
    eager.model.config._attn_implementation = "eager"
    assert eager.loglikelihood(reqs) == pytest.approx(bucketed, abs=1e-5)
    assert caches and len({id(kv) for kv in caches[0][0]}) == 3  # two prefixes and none, in one batch
    for req, lp in zip(reqs, bucketed):
        assert lp == pytest.approx(naive(lm, req)[0], abs=1e-4)


def test_a_recheck_lays_out_each_templates_groups_as_the_float32_pass_would(tiny_folder, lm, monkeypatch):
    """Under bf16 autocast with every group rechecked, an ensemble's call gives exactly the
    float32 scores: each group is rechecked with its own template's prefix."""
    from taskfit.models import hf

    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: True)
    templates = [DEMOS, DEMOS.replace("Question", "Q").replace("Answer", "A"), DEMOS.upper()]
    reqs = [Request(d + r.context, r.continuation, len(d)) for d in templates for r in requests()[:12]]
    always = HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", recheck_margin=1e9))
    assert always.loglikelihood(reqs) == lm.loglikelihood(reqs)
    assert always.rechecked == 9  # 3 questions x 3 templates


def test_rows_attend_at_their_own_width_whatever_their_batch():
    """`_bucketed_attention` hands the model's attention each run of rows of one width (length
    rounded up to 4) and prefix length: the rows' own keys (the batch runs without a cache) after
    their prefixes' keys, cut or zero-padded to the width, so a row's attention has the same
    shapes alone and in any batch; the batch's padding after a row gets zeros."""
    from types import SimpleNamespace

    assert attention.attention_spans([9, 8, 5, 4, 1]) == [(0, 1, 12, 0), (1, 3, 8, 0), (3, 5, 4, 0)]
    assert attention.attention_spans([8, 7, 7, 3], [5, 5, 2, 2]) == [(0, 2, 8, 5), (2, 3, 8, 2), (3, 4, 4, 2)]
    seen = []

    def inner(module, q, k, v, m, **kwargs):
        seen.append((q.shape[0], q.shape[2], k.shape[2], m.shape[-2:], kwargs, k, m))
        return q.transpose(1, 2) + 1, None

    def cache(keys):  # a prefix's key/value cache, one layer (keys as values too)
        return SimpleNamespace(layers=[SimpleNamespace(keys=keys, values=keys)])

    def attend(plan, *args, **kwargs):
        token = attention._BUCKETS.set(plan)
        try:
            return attention._bucketed_attention(None, *args, **kwargs)[0]
        finally:
            attention._BUCKETS.reset(token)

    rows, heads, t, prefix = 3, 2, 6, 5
    query = torch.randn(rows, heads, t, 4)
    key = value = torch.randn(rows, 1, t, 4)  # the rows' own tokens'
    mask = torch.zeros(rows, 1, t, prefix + t)
    shared = cache(torch.randn(1, 1, prefix, 4))
    spans = attention.attention_spans([6, 5, 3], [prefix] * 3)
    out = attend(attention._Buckets(inner, False, spans, [shared] * 3), query, key, value, mask, scaling=0.5)
    assert [x[:5] for x in seen] == [
        (2, 8, prefix + 8, (8, prefix + 8), {"scaling": 0.5}),
        (1, 4, prefix + 4, (4, prefix + 4), {"scaling": 0.5}),
    ]
    k = seen[0][5]
    assert torch.equal(k[:, :, :prefix], shared.layers[0].keys.expand(2, -1, -1, -1))
    assert torch.equal(k[:, :, prefix : prefix + t], key[:2]) and not k[:, :, prefix + t :].any()
    assert out.shape == (rows, t, heads, 4)
    assert torch.equal(out[:2], query[:2].transpose(1, 2) + 1)
    assert torch.equal(out[2, :4], query[2, :, :4].transpose(0, 1) + 1) and not out[2, 4:].any()

    # Rows after different prefixes, one of another length: each row's attention sees its own
    # prefix's keys, then its own; the mask's columns are cut to match.
    seen.clear()
    other = cache(torch.randn(1, 1, 2, 4))
    spans = attention.attention_spans([6, 6, 6], [prefix, prefix, 2])
    attend(
        attention._Buckets(inner, False, spans, [shared, cache(-shared.layers[0].keys), other]), query, key, value, mask
    )
    (_, _, _, _, _, k01, m01), (_, _, _, _, _, k2, m2) = seen
    assert torch.equal(k01[:, :, :prefix], torch.cat([shared.layers[0].keys, -shared.layers[0].keys]))
    assert k2.shape[2] == 2 + 8 and torch.equal(k2[:, :, :2], other.layers[0].keys)
    assert torch.equal(k2[:, :, 2 : 2 + t], key[2:])
    assert m2.shape[-1] == 2 + 8 and torch.equal(
        m2[..., :t, : 2 + t], torch.cat([mask[2:, ..., :2], mask[2:, ..., prefix:]], -1)
    )


def test_every_layer_attends_through_the_buckets_and_the_model_keeps_its_attention(hf_lm, monkeypatch):
    lm = hf_lm
    plans = []
    real = attention._Buckets

    def record(*args):
        plans.append(real(*args))
        return plans[-1]

    monkeypatch.setattr(attention, "_Buckets", record)
    before = lm.model.config._attn_implementation
    scores = lm.loglikelihood(mixed_requests())
    assert plans and all(p.calls == lm.model.config.num_hidden_layers for p in plans)
    assert lm.model.config._attn_implementation == before == "sdpa"
    for req, lp in zip(mixed_requests()[::5], scores[::5]):
        assert lp == pytest.approx(naive(lm, req)[0], abs=1e-4)


def test_sdpa_runs_without_copies_of_the_key_value_heads_and_gives_the_same_bits(hf_lm, monkeypatch):
    """On CPU, transformers' sdpa is called directly with `enable_gqa` (the tiny model has 4 query
    and 2 key/value heads) instead of through transformers' function, which copies each key/value
    head per query head where a mask is given: the same scores, bit for bit."""
    import torch.nn.functional as F

    reqs = mixed_requests()
    real_sdpa, grouped = F.scaled_dot_product_attention, []

    def counting(*args, **kwargs):
        grouped.append(kwargs.get("enable_gqa", False))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    lm = hf_lm
    direct = lm.loglikelihood(reqs)
    assert grouped and all(grouped)
    real_buckets = attention._Buckets
    monkeypatch.setattr(
        attention, "_Buckets", lambda inner, sdpa, spans, caches: real_buckets(inner, False, spans, caches)
    )
    grouped.clear()
    assert lm.loglikelihood(reqs) == direct
    assert grouped and not any(grouped)


def test_exact_scores_are_float32_bits_and_cached_apart_from_bf16_ones(tiny_folder, lm, tmp_path, monkeypatch):
    """`loglikelihood_exact` under bf16 autocast gives a float32 run's scores, bit for bit, and the
    score cache keeps them apart from the bf16 scores of the same requests."""
    from taskfit.models import hf
    from taskfit.models.cached import CachedLM
    from taskfit.store import ScoreCache

    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda: True)
    reqs = mixed_requests()
    mixed = HFLM.load(ModelConfig(name=str(tiny_folder), device="cpu", recheck_margin=0))
    cached = CachedLM(mixed, ScoreCache(tmp_path / "cache.sqlite"))
    rounded = cached.loglikelihood(reqs)
    assert cached.loglikelihood_exact(reqs) == lm.loglikelihood(reqs) != rounded
    assert mixed.rechecked == len({r.context for r in reqs})
    again = CachedLM(mixed, ScoreCache(tmp_path / "cache.sqlite"))
    assert again.loglikelihood(reqs) == rounded and again.loglikelihood_exact(reqs) == lm.loglikelihood(reqs)
    assert again.computed == 0
