"""Prompting logic against a scripted fake LM: templates, demos, verbalizers, normalization, chat."""

from __future__ import annotations

import math

import pytest

import taskfit
from taskfit import TaskfitError, load_experiment, load_task
from taskfit.experiment import plan
from taskfit.models.base import Request
from taskfit.prompting.answers import answer_strings, combine
from taskfit.prompting.demos import select_demos
from taskfit.prompting.strategy import ScorePrompt

MC_HEAD = """\
name: p
task:
  type: multiple_choice
  data: {train: mc_train.jsonl, test: mc_small.jsonl}
  choices: choices
  label: answer
runs:
  r:
    prompt:
"""

CLS_HEAD = """\
name: p
task:
  type: classification
  data: {train: cls_train.csv, test: cls_small.csv}
runs:
  r:
    prompt:
"""

KIM = "Kim dropped her ice cream cone on the ground. How would Kim feel?"


def prompt_yaml(head: str, **prompt) -> str:
    lines = [f"      {key}: {value}" for key, value in prompt.items()]
    return head + "\n".join(lines) + "\n"


def build(write_yaml, head=MC_HEAD, seed=0, chat_fn=None, **prompt):
    """(ScorePrompt, Task) for a one-run experiment with the given prompt settings."""
    path = write_yaml(prompt_yaml(head, **prompt))
    task = load_task(path)
    run_cfg = load_experiment(path).config.runs["r"]
    return ScorePrompt(run_cfg.prompt, task, seed, "runs.r.prompt", chat=chat_fn), task


def error_of(write_yaml, head=MC_HEAD, **prompt) -> str:
    """The error of checking every prompt of the experiment, as `taskfit validate` does."""
    with pytest.raises(TaskfitError) as info:
        plan(write_yaml(prompt_yaml(head, **prompt)))
    return str(info.value)


# ---- templates: prefix and cloze -------------------------------------------------------


def test_prefix_prompt_splits_at_the_slot(write_yaml):
    sp, task = build(write_yaml, template='"Question: {{ question }}\\nAnswer: {{ answer }}"')
    q = sp.query(task.split("test")[0])
    context = f"Question: {KIM}\nAnswer: "
    assert q.prompt == context
    assert q.requests == [[Request(context, answer, len("Question:"))] for answer in ("sad", "excited", "proud")]


def test_cloze_prompt_puts_the_rest_in_the_continuation(write_yaml):
    sp, task = build(write_yaml, template='"{{ question }} Kim felt {{ answer }}, I think."')
    q = sp.query(task.split("test")[0])
    assert [r.context for [r] in q.requests] == [f"{KIM} Kim felt "] * 3
    assert [r.continuation for [r] in q.requests] == ["sad, I think.", "excited, I think.", "proud, I think."]


def test_classification_options_are_label_names_by_default(write_yaml):
    sp, task = build(write_yaml, CLS_HEAD, template='"Review: {{ text }}\\nSentiment: {{ answer }}"')
    q = sp.query(task.split("test")[1])
    context = "Review: The remote broke after one week. Very poor quality.\nSentiment: "
    labels = ("negative", "neutral", "positive")
    assert q.requests == [[Request(context, label, len("Review:"))] for label in labels]


def test_field_named_answer_is_reachable_as_example_answer(write_yaml):
    sp, task = build(
        write_yaml, template='"{{ question }} (key {{ example.answer }}; {{ example.question[:3] }}) {{ answer }}"'
    )
    q = sp.query(task.split("test")[2])
    assert q.prompt.endswith("What did Alex need to do first? (key 1; Ale) ")
    assert q.requests[1][0].continuation == "buy flour"


def test_template_missing_field_is_an_error_naming_it(write_yaml):
    message = error_of(write_yaml, template='"{{ questoin }} {{ answer }}"')
    assert "questoin" in message
    assert "runs.r.prompt.template" in message
    assert "question" in message  # lists the fields that exist


def test_template_missing_attribute_of_example_is_an_error(write_yaml):
    message = error_of(write_yaml, template='"{{ example.hint }} {{ answer }}"')
    assert "hint" in message


@pytest.mark.parametrize(
    ("template", "found"),
    [
        ('"{{ question }}"', 0),
        ('"{{ answer }} {{ question }} {{ answer }}"', 2),
    ],
)
def test_template_needs_exactly_one_answer_slot(write_yaml, template, found):
    message = error_of(write_yaml, template=template)
    assert "{{ answer }}" in message
    assert f"found it {found} times" in message


def test_template_syntax_error(write_yaml):
    message = error_of(write_yaml, template='"{{ question }} {% if %} {{ answer }}"')
    assert "template syntax error" in message
    assert "runs.r.prompt.template" in message


def test_template_cannot_reach_python_internals(write_yaml):
    message = error_of(write_yaml, template='"{{ question.__class__.__mro__[1].__subclasses__() }} {{ answer }}"')
    assert "runs.r.prompt.template" in message


# ---- demonstrations --------------------------------------------------------------------


def test_demos_rendered_with_gold_answer_and_separator(write_yaml, mc_train):
    sp, task = build(write_yaml, template='"Q: {{ question }}\\nA: {{ answer }}"', shots=2, separator='"\\n###\\n"')
    q = sp.query(task.split("test")[0])
    demo1 = f"Q: {mc_train[0]['question']}\nA: return it"
    demo2 = f"Q: {mc_train[1]['question']}\nA: tired"
    assert q.prompt == f"{demo1}\n###\n{demo2}\n###\nQ: {KIM}\nA: "


def test_cloze_demos_include_text_after_the_slot(write_yaml, mc_train):
    sp, task = build(write_yaml, template='"{{ question }} -> {{ answer }}."', shots=1, separator='" | "')
    q = sp.query(task.split("test")[0])
    assert q.prompt == f"{mc_train[0]['question']} -> return it. | {KIM} -> "


def test_demos_never_contain_the_test_example(write_yaml, mc_train):
    sp, task = build(write_yaml, template='"Q: {{ question }}\\nA: {{ answer }}"', shots=6, demos="random")
    train_questions = {r["question"] for r in mc_train}
    for ex in task.split("test"):
        prompt = sp.query(ex).prompt
        demo_part, _, last = prompt.rpartition("\n\n")
        assert last == f"Q: {ex.fields['question']}\nA: "
        assert ex.fields["question"] not in demo_part
        assert all(q in demo_part for q in train_questions)


def test_demo_answers_use_the_verbalizer(write_yaml):
    sp, task = build(
        write_yaml,
        CLS_HEAD,
        template='"{{ text }} => {{ answer }}"',
        shots=3,
        demos="first",
        answers="{positive: [great, good], negative: awful}",
    )
    prompt = sp.query(task.split("test")[0]).prompt
    assert prompt.startswith(
        "Absolutely wonderful stay, friendly staff. => great\n\n"
        "The package arrived broken and late. => awful\n\n"
        "The store opens at nine on weekdays. => neutral\n\n"
    )


def test_demos_first_takes_train_in_order(project, mc_train):
    train = load_task(project / "mc.yaml").split("train")
    assert [d.id for d in select_demos(train, 3, "first", seed=5, where="w")] == ["t1", "t2", "t3"]


def test_demos_random_is_seeded(project):
    train = load_task(project / "mc.yaml").split("train")
    ids = {seed: [d.id for d in select_demos(train, 3, "random", seed=seed, where="w")] for seed in range(4)}
    assert ids[0] == [d.id for d in select_demos(train, 3, "random", seed=0, where="w")]
    assert ids[0] != ids[1]
    assert len({tuple(v) for v in ids.values()}) > 1
    assert all(len(set(v)) == 3 for v in ids.values())  # no demo twice


def test_demos_seed_reaches_prompts(project, write_yaml):
    """Same experiment seed -> same demos; different seed -> different demos."""

    def demo_text(seed):
        sp, task = build(write_yaml, template='"{{ question }} {{ answer }}"', shots=3, demos="random", seed=seed)
        return sp.query(task.split("test")[0]).prompt

    assert demo_text(0) == demo_text(0)
    assert demo_text(0) != demo_text(1)


@pytest.mark.parametrize("shots", [3, 6, 9])
def test_demos_balanced_over_labels(project, shots):
    train = load_task(project / "cls.yaml").split("train")
    demos = select_demos(train, shots, "balanced", seed=0, where="w")
    assert len({d.id for d in demos}) == shots
    counts = [sum(d.gold == g for d in demos) for g in range(3)]
    assert counts == [shots // 3] * 3


def test_demos_balanced_uneven_shots(project):
    train = load_task(project / "cls.yaml").split("train")
    counts = [sum(d.gold == g for d in select_demos(train, 4, "balanced", seed=3, where="w")) for g in range(3)]
    assert sorted(counts) == [1, 1, 2]


def test_demos_balanced_for_multiple_choice_balances_gold_position(project):
    train = load_task(project / "mc.yaml").split("train")
    demos = select_demos(train, 3, "balanced", seed=1, where="w")
    assert sorted(d.gold for d in demos) == [0, 1, 2]


def test_too_many_shots_is_an_error(write_yaml):
    message = error_of(write_yaml, template='"{{ question }} {{ answer }}"', shots=7)
    assert "runs.r.prompt.shots" in message
    assert "7" in message and "6" in message


def test_shots_without_train_split_is_an_error(write_yaml):
    head = MC_HEAD.replace("{train: mc_train.jsonl, test: mc_small.jsonl}", "{test: mc_small.jsonl}")
    message = error_of(write_yaml, head, template='"{{ question }} {{ answer }}"', shots=1)
    assert "task.data.train" in message


# ---- verbalizer --------------------------------------------------------------------------


def test_answer_strings_per_label():
    out = answer_strings(("neg", "neu", "pos"), {"pos": ["great", "good"], "neg": "bad"}, "w")
    assert out == [["bad"], ["neu"], ["great", "good"]]


def test_answers_entry_for_unknown_label(write_yaml):
    message = error_of(write_yaml, CLS_HEAD, template='"{{ text }} {{ answer }}"', answers="{postive: great}")
    assert "'postive' is not one of the task's labels" in message
    assert "Did you mean 'positive'?" in message
    assert "runs.r.prompt.answers" in message


def test_same_answer_for_two_labels_is_an_error():
    with pytest.raises(TaskfitError, match="both 'a' and 'b'"):
        answer_strings(("a", "b"), {"a": "x", "b": ["y", "x"]}, "w")


@pytest.mark.parametrize("answers", [{"a": []}, {"a": [""]}, {"a": ""}])
def test_empty_answer_strings_are_an_error(answers):
    with pytest.raises(TaskfitError, match="no usable answer string"):
        answer_strings(("a", "b"), answers, "w")


def test_answers_on_multiple_choice_is_an_error(write_yaml):
    message = error_of(write_yaml, template='"{{ question }} {{ answer }}"', answers="{a: b}")
    assert "remove `answers`" in message


def test_combine_by_hand():
    assert combine([-1.0, -2.0], "logsumexp") == pytest.approx(math.log(math.exp(-1) + math.exp(-2)))
    assert combine([-1.0, -2.0], "mean") == pytest.approx(-1.5)
    assert combine([-3.0], "logsumexp") == -3.0
    assert combine([-1000.0, -1000.0], "logsumexp") == pytest.approx(-1000 + math.log(2))  # no underflow


VERBALIZER_SCORES = {"great": -1.0, "good": -2.6, "awful": -1.5, "neutral": -4.0}


@pytest.mark.parametrize(
    ("combine_how", "expected_positive", "prediction"),
    [
        ("logsumexp", math.log(math.exp(-1.0) + math.exp(-2.6)), "positive"),  # -0.816 beats awful's -1.5
        ("mean", (-1.0 - 2.6) / 2, "negative"),  # -1.8 loses to -1.5
    ],
)
def test_several_answer_strings_combine(write_yaml, fake_lm, combine_how, expected_positive, prediction):
    sp, task = build(
        write_yaml,
        CLS_HEAD,
        template='"{{ text }} => {{ answer }}"',
        answer_pooling=combine_how,
        answers="{positive: [great, good], negative: awful}",
    )
    lm = fake_lm(VERBALIZER_SCORES)
    q = sp.query(task.split("test")[0])
    assert [[r.continuation for r in reqs] for reqs in q.requests] == [["awful"], ["neutral"], ["great", "good"]]
    reqs = [r for reqs in q.requests for r in reqs]
    row = sp.predict(q, dict(zip(reqs, lm.loglikelihood(reqs), strict=True)))
    assert row["scores"] == pytest.approx([-1.5, -4.0, expected_positive])
    assert row["prediction"] == prediction
    assert row["label"] == "positive"
    assert row["correct"] is (prediction == "positive")


def test_verbalizer_end_to_end(project, write_yaml, fake_lm, read_jsonl):
    path = write_yaml(
        prompt_yaml(
            CLS_HEAD, template='"{{ text }} => {{ answer }}"', answers="{positive: [great, good], negative: awful}"
        )
    )
    lm = fake_lm(VERBALIZER_SCORES)
    results = taskfit.run(path, lm=lm, out=project / "out")
    rows = read_jsonl(project / "out" / "r" / "predictions.jsonl")
    assert {r["prediction"] for r in rows} == {"positive"}
    assert results["r"]["accuracy"] == pytest.approx(3 / 8)
    assert {r.continuation for r in lm.requests} == {"great", "good", "awful", "neutral"}


# ---- scoring ------------------------------------------------------------------------------


NORMALIZE_SCORES = {"sad": -6.0, "excited": -7.0, "proud": -10.0}  # per char: -2, -1, -2


@pytest.mark.parametrize(("normalize", "prediction"), [("none", 0), ("length", 1)])
def test_length_normalization_divides_by_characters(write_yaml, fake_lm, normalize, prediction):
    sp, task = build(write_yaml, template='"{{ question }} {{ answer }}"', normalize=normalize)
    q = sp.query(task.split("test")[0])
    reqs = [r for reqs in q.requests for r in reqs]
    row = sp.predict(q, dict(zip(reqs, fake_lm(NORMALIZE_SCORES).loglikelihood(reqs), strict=True)))
    assert row["prediction"] == prediction
    assert row["scores"] == [-6.0, -7.0, -10.0]  # raw scores whatever the normalization
    if normalize == "length":
        assert row["normalized_scores"] == pytest.approx([-2.0, -1.0, -2.0])
    else:
        assert "normalized_scores" not in row


def test_length_normalization_counts_the_whole_continuation(write_yaml, fake_lm):
    """In a cloze prompt the continuation is answer + the rest of the template."""
    sp, task = build(write_yaml, template='"{{ question }} {{ answer }}!!!"', normalize="length")
    q = sp.query(task.split("test")[0])
    reqs = [r for reqs in q.requests for r in reqs]
    assert [r.continuation for r in reqs] == ["sad!!!", "excited!!!", "proud!!!"]
    lm = fake_lm(fn=lambda r: NORMALIZE_SCORES[r.continuation.rstrip("!")])
    row = sp.predict(q, dict(zip(reqs, lm.loglikelihood(reqs), strict=True)))
    assert row["normalized_scores"] == pytest.approx([-6 / 6, -7 / 10, -10 / 8])
    assert row["prediction"] == 1


def test_ties_go_to_the_first_option(write_yaml, fake_lm):
    sp, task = build(write_yaml, template='"{{ question }} {{ answer }}"')
    q = sp.query(task.split("test")[0])
    reqs = [r for reqs in q.requests for r in reqs]
    row = sp.predict(q, dict(zip(reqs, fake_lm(fn=lambda r: -2.0).loglikelihood(reqs), strict=True)))
    assert row["prediction"] == 0


def test_chat_wraps_the_prompt_as_a_user_turn(write_yaml, fake_lm):
    lm = fake_lm()
    sp, task = build(
        write_yaml, template='"Question: {{ question }}\\nAnswer: {{ answer }}"', chat="true", shots=1, chat_fn=lm.chat
    )
    q = sp.query(task.split("test")[0])
    user = f"Question: {task.split('train')[0].fields['question']}\nAnswer: return it\n\nQuestion: {KIM}\nAnswer:"
    assert lm.chats == [user]
    assert q.prompt == f"<user>{user}</user><assistant>"
    assert [r.context for [r] in q.requests] == [q.prompt] * 3
    assert [r.continuation for [r] in q.requests] == ["sad", "excited", "proud"]


@pytest.mark.parametrize("chat", [False, True])
def test_fixed_demos_are_the_shared_start_of_every_context(write_yaml, fake_lm, chat):
    """A context's `shared` start (what scoring and generation compute once per run) runs through
    the chat header, the fixed demonstrations and the template's literal start but its trailing
    space (which tokenizes with the word after it); it is the same text for every example."""
    from taskfit.prompting.builder import shared_start

    template = '"Question: {{ question }}\\nAnswer: {{ answer }}"'
    header = "<user>" if chat else ""
    sp, task = build(write_yaml, template=template, shots=2, chat=str(chat).lower(), chat_fn=fake_lm().chat)
    contexts = [sp.builder.context(ex) for ex in task.split("test")]
    demos = sp.builder.demo_text(task.split("test")[0])
    starts = {c.text[: c.shared] for c in contexts}
    assert starts == {header + demos + "Question:"} and len(contexts) > 1
    zero, _ = build(write_yaml, template=template, chat=str(chat).lower(), chat_fn=fake_lm().chat)
    assert {c.text[: c.shared] for c in map(zero.builder.context, task.split("test"))} == {header + "Question:"}
    # `similar` demonstrations are drawn per example: only a chat header is shared
    assert shared_start("<user>demos + question", "demos + question", "demos", "", fixed=False) == 6
    assert shared_start("demos + question", "demos + question", "demos", "", fixed=False) == 0
    # a lead the text does not continue with (a chat template that rewrote it) is not claimed
    assert shared_start("demos + Q: x", "demos + Q: x", "demos + ", "A: ", fixed=True) == 8


def similar_and_calibrated(write_yaml):
    """(ScoreStrategy, Task, PromptConfig, first three test examples) of a 2-shot `demos: similar`
    run with contextual calibration."""
    from taskfit.prompting.strategy import ScoreStrategy

    template = '"Review: {{ text }}\\nSentiment: {{ answer }}"'
    path = write_yaml(prompt_yaml(CLS_HEAD, template=template, shots=2, demos="similar", calibrate="contextual"))
    task, cfg = load_task(path), load_experiment(path).config.runs["r"].prompt
    strategy = ScoreStrategy(cfg, task, 0, "runs.r.prompt", cfg.template_list)
    return strategy, task, cfg, list(task.split("test"))[:3]


def test_calibration_with_per_example_demos_shows_the_examples_own_demos(write_yaml):
    """Contextual calibration measures the bias of the prompt the example is scored with: under
    `demos: similar` (demonstrations per example) each content-free input shows its example's
    demonstrations, not those nearest to "N/A", and the example's queries all declare those
    demonstrations as their shared start (computed once for the four of them)."""
    strategy, task, cfg, examples = similar_and_calibrated(write_yaml)
    demo_sets = set()
    for ex in examples:
        demos = strategy.prompts[0].builder.demo_text(ex)
        demo_sets.add(demos)
        real = strategy.prompts[0].query(ex, share_demos=True)
        free = [strategy.prompts[0].query(cf, ex, True) for cf in strategy._content_free(ex)]
        assert [q.prompt for q in free] == [f"{demos}Review: {text}\nSentiment: " for text in cfg.content_free]
        starts = {r.context[: r.shared] for q in [real, *free] for reqs in q.requests for r in reqs}
        assert starts == {demos + "Review:"}
    assert len(demo_sets) > 1  # the demonstrations are the examples' own
    # without calibration, a query's demonstrations are its own and nothing is declared shared
    plain = type(strategy)(cfg.model_copy(update={"calibrate": "none"}), task, 0, "runs.r.prompt", cfg.template_list)
    assert {r.shared for ex in examples for reqs in plain.prompts[0].query(ex).requests for r in reqs} == {0}


def test_calibration_queries_of_per_example_demos_reach_the_model(write_yaml, fake_lm):
    """End to end through `predict`: what the model is asked for the content-free inputs under
    `demos: similar` starts with each example's own demonstrations."""
    strategy, task, cfg, examples = similar_and_calibrated(write_yaml)
    lm = fake_lm()
    strategy.predict(examples, lm)
    for ex in examples:
        demos = strategy.prompts[0].builder.demo_text(ex)
        asked = {r.context for r in lm.requests if r.context.startswith(demos)}
        assert asked == {demos + f"Review: {t}\nSentiment: " for t in [ex.fields["text"], *cfg.content_free]}


def test_chat_end_to_end_uses_lm_chat(project, write_yaml, fake_lm, read_jsonl):
    path = write_yaml(prompt_yaml(MC_HEAD, template='"Question: {{ question }}\\nAnswer: {{ answer }}"', chat="true"))
    lm = fake_lm()
    taskfit.run(path, lm=lm, out=project / "out")
    assert len(lm.chats) == 8
    assert all(
        r.context.startswith("<user>Question: ") and r.context.endswith("</user><assistant>") for r in lm.requests
    )
    rows = read_jsonl(project / "out" / "r" / "predictions.jsonl")
    assert rows[0]["prompt"] == f"<user>Question: {KIM}\nAnswer:</user><assistant>"


def test_without_chat_lm_chat_is_not_used(project, fake_lm):
    lm = fake_lm()
    taskfit.run(project / "mc.yaml", lm=lm, out=project / "out")
    assert lm.chats == []
    assert lm.requests[0].context == f"Question: {KIM}\nAnswer: "


def test_demos_never_include_a_test_example():
    """A train file that contains a test item (same content, other id) must not show it as a demo."""
    from taskfit.data import Example
    from taskfit.prompting.demos import select_demos

    test = [Example("q1", {"id": "q1", "text": "same"}, ("a", "b"), 0)]
    train = [Example("t1", {"id": "t1", "text": "same"}, ("a", "b"), 0)] + [
        Example(f"t{i}", {"id": f"t{i}", "text": f"other {i}"}, ("a", "b"), i % 2) for i in range(2, 6)
    ]
    for how in ("first", "random", "balanced"):
        demos = select_demos(train, 3, how, 0, "runs.x.prompt", exclude=test)
        assert len(demos) == 3 and all(d.fields["text"] != "same" for d in demos)


def test_the_test_split_is_read_once_per_train_split_for_demo_exclusion():
    """Strategies built again and again (cells, templates, dev selection) over one test split
    stream it once per distinct train split; the exclusion stays right for each."""
    from taskfit.data import Example
    from taskfit.prompting.demos import select_demos

    class Counted(list):
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return super().__iter__()

    test = Counted([Example("q1", {"id": "q1", "text": "same"}, ("a", "b"), 0)])
    train = [Example("t1", {"id": "t1", "text": "same"}, ("a", "b"), 0)] + [
        Example(f"t{i}", {"id": f"t{i}", "text": f"other {i}"}, ("a", "b"), i % 2) for i in range(2, 6)
    ]
    memo: dict = {}
    for seed in range(5):
        demos = select_demos(train, 3, "random", seed, "runs.x.prompt", exclude=test, memo=memo)
        assert all(d.fields["text"] != "same" for d in demos)
    assert Counted.passes == 1
    assert [d.id for d in select_demos(train[1:], 4, "first", 0, "runs.x.prompt", exclude=test, memo=memo)] == [
        "t2",
        "t3",
        "t4",
        "t5",
    ]
    assert Counted.passes == 2  # another train split: read again
    with_same = train[1:] + [Example("t9", {"id": "t9", "text": "same"}, ("a", "b"), 1)]
    assert "t9" not in [d.id for d in select_demos(with_same, 4, "first", 0, "runs.x.prompt", exclude=test, memo=memo)]
    assert Counted.passes == 2  # the same contents as `train` (other ids): known already
    select_demos(train, 3, "first", 0, "runs.x.prompt", exclude=test)  # no memo: read every time
    assert Counted.passes == 3


# ---- bf16 near-ties, rechecked after pooling -------------------------------------------


CLOSE = "The remote broke"  # test example c2: its labels end within the margin only once pooled


@pytest.mark.parametrize("calibrate", [False, True])
def test_near_ties_that_pooling_makes_are_rechecked_in_float32_for_that_example_alone(write_yaml, fake_lm, calibrate):
    """A backend under bf16 rechecks where two answer strings are within its margin; pooling two
    strings per label can bring labels within it while the strings are not (c2: "bad" -0.5,
    "great" and "good" -1.0 each: labels 0.19 apart, strings 0.5). The strategy scores that
    example's queries again in float32 (`loglikelihood_exact`) and only those: every other row,
    its content-free queries (shared by all examples) included, keeps its bf16 scores."""
    from taskfit.prompting.strategy import ScoreStrategy

    bf16 = {"great": -1.0, "good": -1.0, "bad": -0.5, "awful": -9.0, "okay": -9.0, "fine": -9.0, "free okay": -1.0}
    exact = {**bf16, "great": -1.2, "good": -1.2, "free okay": -1.5}  # float32 turns c2 to negative

    def scores(table):
        def score(r):
            if CLOSE in r.context:
                return table[r.continuation]
            if any(ex.fields["text"] in r.context for ex in examples):
                return -0.1 if r.continuation == "great" else -5.0
            return table["free okay"] if r.continuation == "okay" else -5.0  # a content-free query

        return score

    class Bf16LM(fake_lm):
        def __init__(self, margin):
            super().__init__(fn=scores(bf16))
            self.identity = {**self.identity, **({"recheck_margin": margin} if margin else {})}
            self.exact_calls = []

        def loglikelihood_exact(self, requests):
            self.exact_calls.append(list(requests))
            return [scores(exact)(r) for r in requests]

    answers = "{positive: [great, good], negative: [bad, awful], neutral: [okay, fine]}"
    extra = {"calibrate": "contextual"} if calibrate else {}
    path = write_yaml(
        prompt_yaml(CLS_HEAD, template='"Review: {{ text }}\\nSentiment: {{ answer }}"', answers=answers, **extra)
    )
    task = load_task(path)
    cfg = load_experiment(path).config.runs["r"].prompt
    examples = list(task.split("test"))

    def predict(margin):
        lm = Bf16LM(margin)
        strategy = ScoreStrategy(cfg, task, 0, "runs.r.prompt", [cfg.template_list[0]])
        return strategy.predict(examples, lm), lm

    plain, lm = predict(0)
    assert lm.exact_calls == []
    rows, lm = predict(0.2)
    (called,) = lm.exact_calls
    mine = [r for r in called if CLOSE in r.context]
    assert len(mine) == 6  # c2's six answer strings, and under calibration its content-free queries'
    assert len(called) == 6 * (1 + len(cfg.content_free)) if calibrate else called == mine
    c2 = next(i for i, ex in enumerate(examples) if CLOSE in ex.fields["text"])
    assert plain[c2]["prediction"] == "positive" and rows[c2]["prediction"] == "negative"
    assert [r for i, r in enumerate(rows) if i != c2] == [r for i, r in enumerate(plain) if i != c2]


def test_a_near_tie_of_an_ensembles_average_rechecks_its_templates(write_yaml, fake_lm):
    """`combine: mean_prob` predicts from the templates' averaged probabilities: two templates
    leaning 0.5 nats apart in opposite directions tie on average, and under bf16 both are scored
    again in float32, though neither alone is within the margin."""
    from taskfit.prompting.strategy import ScoreStrategy

    def score(table):
        def fn(r):
            lean = table["A"] if r.context.startswith("A:") else table["B"]
            return lean.get(r.continuation, -9.0)

        return fn

    bf16 = {"A": {"positive": -0.5, "negative": -1.0}, "B": {"positive": -1.0, "negative": -0.5}}
    exact = {"A": {"positive": -0.4, "negative": -1.0}, "B": {"positive": -1.0, "negative": -0.5}}

    class Bf16LM(fake_lm):
        def __init__(self):
            super().__init__(fn=score(bf16))
            self.identity = {**self.identity, "recheck_margin": 0.2}
            self.exact_calls = []

        def loglikelihood_exact(self, requests):
            self.exact_calls.append(list(requests))
            return [score(exact)(r) for r in requests]

    templates = '["A: {{ text }} => {{ answer }}", "B: {{ text }} => {{ answer }}"]'
    path = write_yaml(prompt_yaml(CLS_HEAD, templates=templates))
    task, cfg = load_task(path), load_experiment(path).config.runs["r"].prompt
    examples = list(task.split("test"))[:2]
    lm = Bf16LM()
    rows = ScoreStrategy(cfg, task, 0, "runs.r.prompt", cfg.template_list).predict(examples, lm)
    (called,) = lm.exact_calls
    assert {r.context[:2] for r in called} == {"A:", "B:"} and len(called) == 2 * 2 * 3  # 2 examples x 2 templates
    assert all(r["prediction"] == "positive" for r in rows)  # float32's average leans positive


@pytest.mark.parametrize(
    "expression",
    ["{{ 1/0 }}", "{{ question + 1 }}", "{{ '%d' % question }}", "{{ range(10**9)|length }}", "{% include 'x' %}"],
)
def test_template_that_fails_while_rendering_names_template_and_example(write_yaml, expression):
    message = error_of(write_yaml, template=f'"{expression} {{{{ question }}}} {{{{ answer }}}}"')
    assert "runs.r.prompt.template" in message
    assert "rendering failed for example" in message and "mc_small.jsonl:1" in message


def test_answer_format_that_fails_while_rendering_is_a_taskfit_error():
    from taskfit.prompting.template import render_plain

    with pytest.raises(TaskfitError, match="runs.r.prompt.answer_format: rendering failed: ZeroDivisionError"):
        render_plain("{{ rationale }} {{ 1/0 }}", {"rationale": "r"}, "runs.r.prompt.answer_format")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "field 'question' is null"), (["p", "q"], "field 'question' is a list")],
)
def test_template_field_that_is_null_or_a_list_is_an_error(project, write_yaml, mc_train, value, expected):
    import json

    rows = [mc_train[0], {**mc_train[1], "question": value}]
    (project / "mc_small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    message = error_of(write_yaml, template='"{{ question }} {{ answer }}"')
    assert "mc_small.jsonl:2" in message
    assert expected in message and "runs.r.prompt.template" in message


def test_template_may_loop_over_a_list_field(write_yaml):
    sp, task = build(write_yaml, template="\"{{ question }} ({{ choices|join(', ') }}) {{ answer }}\"")
    assert sp.query(task.split("test")[0]).prompt.endswith("(sad, excited, proud) ")
