"""The prompting toolbox with a scripted LM: chain of thought, voting, ensembles,
calibration, template selection on dev, spread across templates and demonstration sets."""

from __future__ import annotations

import json
import math
import re

import pytest

import taskfit
from taskfit.errors import TaskfitError
from taskfit.models.base import GenerationRequest, Request
from taskfit.prompting.answers import combine
from taskfit.prompting.extract import canonical, extract, majority_text, majority_vote, match_option
from taskfit.prompting.strategy import softmax

YESNO_TRAIN = [
    {"id": f"t{i}", "question": q, "rationale": r, "answer": a}
    for i, (q, r, a) in enumerate(
        [
            ("Is ice cold?", "Ice is frozen water.", "yes"),
            ("Can fish fly?", "Fish swim in water.", "no"),
            ("Is the sun hot?", "The sun is a star.", "yes"),
            ("Do rocks eat?", "Rocks are not alive.", "no"),
        ]
        * 4
    )
]
YESNO_TEST = [
    {"id": "q1", "question": "Is fire hot?", "answer": "yes"},
    {"id": "q2", "question": "Can a cat read?", "answer": "no"},
    {"id": "q3", "question": "Is snow white?", "answer": "yes"},
]


class ScriptedLM:
    """Generations from `script(context, sample, seed) -> text`; log-likelihoods from `score`."""

    def __init__(self, script=None, score=None):
        self.identity = {"name": "scripted", "dtype": "float32", "device": "cpu"}
        self.script = script or (lambda ctx, s, seed: " So the answer is yes.")
        self.score = score or (lambda r: -1.0 if r.continuation.startswith(("yes", " yes")) else -2.0)
        self.generated: list[GenerationRequest] = []
        self.scored: list[Request] = []

    def generate(self, requests):
        self.generated.extend(requests)
        return [[self.script(r.context, s, r.seed) for s in range(r.samples)] for r in requests]

    def loglikelihood(self, requests):
        self.scored.extend(requests)
        return [self.score(r) for r in requests]

    def chat(self, text):
        return text


@pytest.fixture
def yesno(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in YESNO_TRAIN))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in YESNO_TEST))

    def write(prompt: str, extra: str = "") -> str:
        text = (
            "name: yn\ntask: {type: classification, data: {train: train.jsonl, test: test.jsonl}, label: answer}\n"
            f"{extra}runs:\n  r:\n    prompt:\n" + "".join(f"      {line}\n" for line in prompt.strip().splitlines())
        )
        (tmp_path / "exp.yaml").write_text(text)
        return str(tmp_path / "exp.yaml")

    return write


def rows_of(out, folder="r"):
    return [json.loads(line) for line in (out / folder / "predictions.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- pure functions


def test_extract_takes_the_first_match_and_first_group():
    pattern = re.compile(r"answer is (yes|no)")
    assert extract("so the answer is no. Later the answer is yes", pattern) == "no"
    assert extract("no answer here", pattern) is None
    assert extract("  plain text \n", None) == "plain text"


def test_match_option_is_case_and_punctuation_insensitive_and_unicode_safe():
    options = [["yes", "yeah"], ["no"], ["café"]]
    assert match_option("YES.", options) == 0
    assert match_option(" Yeah! ", options) == 0
    assert match_option("CAFÉ", options) == 2
    assert match_option("maybe", options) is None
    assert match_option(None, options) is None
    assert match_option("yes", [["yes"], ["Yes"]]) is None  # ambiguous: no silent pick
    assert canonical("ﬁne") == "fine"  # NFKC folds the ligature


def test_majority_vote_ties_go_to_the_first_seen_and_failures_count():
    assert majority_vote([1, 0, 0, 1]) == (1, 0.5)
    assert majority_vote([None, 2, None]) == (2, pytest.approx(1 / 3))
    assert majority_vote([None, None]) == (None, 0.0)
    assert majority_text(["Paris", "paris.", "Lyon"]) == ("Paris", pytest.approx(2 / 3))
    # grouped as exact match compares answers (articles too), and an empty answer does not win
    assert majority_text(["the Paris", "Paris", "Lyon", "Lyon"]) == ("the Paris", 0.5)  # a tie: first written
    assert majority_text(["", "", "Paris", "Lyon", "Rome"]) == ("Paris", 0.2)
    assert majority_text(["", " "]) == ("", 1.0)


# ---------------------------------------------------------------- chain of thought and voting


def test_few_shot_cot_demos_show_rationales_and_extract_answers(yesno, tmp_path):
    lm = ScriptedLM(
        script=lambda ctx, s, seed: (
            " Fire burns. So the answer is yes." if "fire" in ctx[-40:] else " Cats cannot. So the answer is no."
        )
    )
    path = yesno(
        'template: "Q: {{ question }}\\nA: {{ answer }}"\nshots: 2\nchain_of_thought: true\n'
        'extract: "answer is (yes|no)"'
    )
    results = taskfit.run(path, out=tmp_path / "out", lm=lm)
    prompt = lm.generated[0].context
    assert "Q: Is ice cold?\nA: Ice is frozen water. So the answer is yes.\n\n" in prompt
    assert lm.generated[0].stop == ("\n\n",) and lm.generated[0].temperature == 0
    rows = rows_of(tmp_path / "out")
    assert [r["prediction"] for r in rows] == ["yes", "no", "no"]
    assert results["r"]["extraction_failed"] == 0.0 and results["r"]["accuracy"] == pytest.approx(2 / 3)
    assert lm.scored == []  # every answer extracted: no fallback scoring


def test_failed_extraction_falls_back_to_scoring_and_is_reported(yesno, tmp_path, caplog):
    lm = ScriptedLM(
        script=lambda ctx, s, seed: " I am not sure.", score=lambda r: -0.5 if r.continuation == "no" else -3.0
    )
    path = yesno(
        'template: "Q: {{ question }}\\nA: {{ answer }}"\nchain_of_thought: true\nextract: "answer is (yes|no)"'
    )
    results = taskfit.run(path, out=tmp_path / "out", lm=lm)
    assert lm.generated[0].context.endswith("A: Let's think step by step.")  # zero-shot trigger
    assert results["r"]["extraction_failed"] == 1.0
    assert "no answer could be read from 100% of the generated texts" in caplog.text  # the table shows accuracy
    assert all(r["prediction"] == "no" for r in rows_of(tmp_path / "out"))
    assert lm.scored[0].context.endswith("I am not sure. So the answer is ")


@pytest.mark.parametrize("pooling", ["logsumexp", "mean"])
def test_the_fallback_pools_answer_strings_as_a_scored_run_does(yesno, tmp_path, pooling):
    """After a failed extraction, a label's several answer strings combine as `answer_pooling`
    says (it used to take the best string whatever the setting); `vote: mean_prob` shows the
    sample's option probabilities."""
    scores = {"yes": -1.0, "sure": -4.0, "no": -1.5, "nope": -1.6}
    lm = ScriptedLM(script=lambda ctx, s, seed: " Hmm.", score=lambda r: scores[r.continuation.strip()])
    path = yesno(
        'template: "Q: {{ question }}\nA: {{ answer }}"\nchain_of_thought: true\nextract: "answer is (yes|no)"\n'
        f"answers: {{'yes': ['yes', sure], 'no': ['no', nope]}}\nanswer_pooling: {pooling}\nvote: mean_prob"
    )
    taskfit.run(path, out=tmp_path / "out", lm=lm)
    labels = json.loads((tmp_path / "out" / "r" / "manifest.json").read_text())["task"]["labels"]
    strings = {"yes": ["yes", "sure"], "no": ["no", "nope"]}
    pooled = [combine([scores[a] for a in strings[label]], pooling) for label in labels]
    assert rows_of(tmp_path / "out")[0]["probabilities"] == pytest.approx(softmax(pooled), rel=1e-12)


def test_the_space_before_the_answer_is_generated_not_prompted(yesno, tmp_path):
    # "A: {{ answer }}": the model continues "A:" and writes " yes" itself (a prompt ending in a
    # lone space token derails small models); the fallback scores the options after its text
    lm = ScriptedLM(script=lambda ctx, s, seed: " Unsure.", score=lambda r: -0.5 if r.continuation == "no" else -3.0)
    results = taskfit.run(
        yesno('template: "Q: {{ question }}\\nA: {{ answer }}"\nextract: "(yes|no)"'), out=tmp_path / "out", lm=lm
    )
    assert all(r.context.endswith("?\nA:") for r in lm.generated)
    assert lm.scored[0].context.endswith("?\nA: Unsure.") and lm.scored[0].continuation in ("yes", "no")
    assert results["r"]["extraction_failed"] == 1.0
    assert [r["prompt"][-3:] for r in rows_of(tmp_path / "out")] == ["A: "] * 3  # the rendered prompt, as written


def test_self_consistency_votes_and_reports_agreement(yesno, tmp_path):
    answers = ["yes", "no", "yes", "yes", "no", "yes", "no", "yes"]
    lm = ScriptedLM(script=lambda ctx, s, seed: f" So the answer is {answers[s]}.")
    path = yesno(
        'template: "Q: {{ question }}\\nA: {{ answer }}"\nchain_of_thought: true\n'
        'extract: "answer is (yes|no)"\nsamples: 8\ntemperature: 0.7\ntop_p: 0.95'
    )
    results = taskfit.run(path, out=tmp_path / "out", lm=lm)
    assert lm.generated[0].samples == 8 and lm.generated[0].top_p == 0.95
    rows = rows_of(tmp_path / "out")
    assert all(r["prediction"] == "yes" and r["vote_agreement"] == 5 / 8 for r in rows)
    assert rows[0]["probabilities"] == [3 / 8, 5 / 8]  # label order: no, yes
    assert results["r"]["vote_agreement"] == 5 / 8


@pytest.mark.parametrize(("samples", "calls"), [(1, [2, 1]), (2, [1, 1, 1])])
def test_generating_chunks_hold_a_budget_of_sequences(yesno, tmp_path, monkeypatch, samples, calls):
    """A generating run hands the model chunks of at least CHUNK examples, more while their
    samples stay within GENERATION_SEQUENCES (slots refill within a call, not across calls)."""
    import taskfit.cell

    monkeypatch.setattr(taskfit.cell, "CHUNK", 1)
    monkeypatch.setattr(taskfit.cell, "GENERATION_SEQUENCES", 2)
    sizes = []

    class Counting(ScriptedLM):
        def generate(self, requests):
            sizes.append(len(requests))
            return super().generate(requests)

    sampling = f"\nsamples: {samples}\ntemperature: 0.7" if samples > 1 else ""
    path = yesno('template: "Q: {{ question }}\\nA: {{ answer }}"\nextract: "(yes|no)"' + sampling)
    taskfit.run(path, out=tmp_path / "out", lm=Counting())
    assert sizes == calls
    assert len(rows_of(tmp_path / "out")) == 3


@pytest.mark.parametrize("margin", [0, 0.2])
def test_mean_prob_near_ties_are_rechecked_in_float32_for_that_example_alone(yesno, tmp_path, margin):
    """Under bf16, averaging the samples' option probabilities (`vote: mean_prob`) can bring two
    options within the margin where no sample's answer strings were (q1: sample 0 says yes by
    1.4 nats, sample 1 no by 1.8: means 0.47 / 0.53); that example's option scores are computed
    again in float32, and only its own."""
    bf16 = {("fire", 0): (-0.1, -1.5), ("fire", 1): (-2.0, -0.2)}  # (yes, no)
    exact = {**bf16, ("fire", 1): (-0.5, -0.6)}  # float32: sample 1 barely says yes

    def scores(table):
        def score(r):
            yes, no = table.get(("fire" if "fire" in r.context else "", int("Hmm" in r.context)), (-0.1, -3.0))
            return yes if r.continuation.strip() == "yes" else no

        return score

    class Bf16LM(ScriptedLM):
        def __init__(self):
            super().__init__(script=lambda ctx, s, seed: " Hmm." if s else " I think so.", score=scores(bf16))
            self.identity = {**self.identity, **({"recheck_margin": margin} if margin else {})}
            self.exact: list = []

        def loglikelihood_exact(self, requests):
            self.exact.extend(requests)
            return [scores(exact)(r) for r in requests]

    lm = Bf16LM()
    path = yesno(
        'template: "Q: {{ question }}\\nA: {{ answer }}"\nchain_of_thought: true\nextract: "answer is (yes|no)"\n'
        "samples: 2\ntemperature: 0.7\nvote: mean_prob"
    )
    taskfit.run(path, out=tmp_path / "out", lm=lm)
    rows = rows_of(tmp_path / "out")
    if not margin:
        assert lm.exact == [] and [r["prediction"] for r in rows] == ["no", "yes", "yes"]
        return
    assert len(lm.exact) == 4 and all("fire" in r.context for r in lm.exact)  # q1's 2 samples x 2 options
    assert [r["prediction"] for r in rows] == ["yes", "yes", "yes"]
    assert rows[0]["probabilities"][1] == pytest.approx((1 / (1 + math.exp(-1.4)) + 1 / (1 + math.exp(-0.1))) / 2)


def test_fallback_scoring_after_similar_demos_shares_each_examples_demos(yesno, tmp_path):
    """With demonstrations of its own per example (`demos: similar`), the fallback requests of all
    samples of an example declare those demonstrations (and the template's lead) as their shared
    start, so they are computed once for the example rather than once per sample."""
    lm = ScriptedLM(script=lambda ctx, s, seed: f" Unsure {s}.")  # no answer to extract: every sample falls back
    path = yesno(
        'template: "Q: {{ question }}\\nA: {{ answer }}"\nshots: 2\ndemos: similar\nchain_of_thought: true\n'
        'extract: "answer is (yes|no)"\nsamples: 2\ntemperature: 0.7'
    )
    taskfit.run(path, out=tmp_path / "out", lm=lm)
    starts: dict[str, set[str]] = {}
    for r in lm.scored:
        question = r.context.split("Q: ")[-1].split("\n")[0]
        starts.setdefault(question, set()).add(r.context[: r.shared])
    assert len(lm.scored) == 3 * 2 * 2  # 3 questions x 2 samples x 2 options
    assert all(len(s) == 1 for s in starts.values())  # one start per example, whatever the sample
    for question, (start,) in starts.items():
        assert start.endswith("Q:") and start.count("Q: ") == 2 and question not in start
    assert len({s for (s,) in starts.values()}) > 1  # each example's own demonstrations


# ---------------------------------------------------------------- ensembles and calibration

TEMPLATES = 'templates:\n  - "Q: {{ question }}\\nA: {{ answer }}"\n  - "{{ question }} Answer: {{ answer }}"\n'


def _template_bias(r):
    """Template 0 always says yes; template 1 answers correctly for 'fire'/'snow' questions."""
    if r.context.startswith("Q:"):
        return -1.0 if r.continuation.strip() == "yes" else -2.0
    right = "yes" if ("fire" in r.context or "snow" in r.context) else "no"
    return -1.0 if r.continuation.strip() == right else -4.0


@pytest.mark.parametrize("combine", ["mean_prob", "vote"])
def test_template_ensemble(yesno, tmp_path, combine):
    path = yesno(TEMPLATES + f"combine: {combine}")
    taskfit.run(path, out=tmp_path / "out", lm=ScriptedLM(score=_template_bias))
    rows = rows_of(tmp_path / "out")
    assert [r["template_predictions"] for r in rows] == [["yes", "yes"], ["yes", "no"], ["yes", "yes"]]
    # mean_prob: template 1's confident 'no' outweighs template 0's weak 'yes'; vote: a tie goes to the first
    assert rows[1]["prediction"] == ("no" if combine == "mean_prob" else "yes")


def test_combine_each_reports_the_spread_across_templates(yesno, tmp_path):
    results = taskfit.run(yesno(TEMPLATES + "combine: each"), out=tmp_path / "out", lm=ScriptedLM(score=_template_bias))
    assert results["r[t0]"]["accuracy"] == pytest.approx(2 / 3) and results["r[t1]"]["accuracy"] == 1.0
    spread = results["r"]
    assert spread["variants"] == ["r[t0]", "r[t1]"]
    assert spread["accuracy_min"] == pytest.approx(2 / 3) and spread["accuracy_max"] == 1.0
    assert spread["accuracy_std"] == pytest.approx(((1 / 6) ** 2 * 2) ** 0.5)
    assert (tmp_path / "out" / "r" / "t1" / "predictions.jsonl").is_file()


def test_select_on_dev_chooses_on_dev_only(yesno, tmp_path):
    def dev_expert(r):  # template 1 is perfect on the train questions, wrong on the test ones
        if r.context.startswith("Q:"):
            return -1.0 if r.continuation.strip() == "yes" else -2.0
        right = "yes" if ("ice" in r.context or "sun" in r.context) else "no"
        return -1.0 if r.continuation.strip() == right else -4.0

    lm = ScriptedLM(score=dev_expert)
    results = taskfit.run(yesno(TEMPLATES + "combine: select_on_dev"), out=tmp_path / "out", lm=lm)
    selection = json.loads((tmp_path / "out" / "r" / "manifest.json").read_text())["selection"]
    assert selection["dev_size"] == 10 and selection["dev_scores"][1] == 1.0
    assert selection["chosen_template"] == 1  # best on dev, although template 0 is better on test
    assert results["r"]["accuracy"] == pytest.approx(1 / 3)
    test_questions = [r["question"] for r in YESNO_TEST]
    dev_requests = lm.scored[: -len(YESNO_TEST) * 2]
    assert not any(q in r.context for r in dev_requests for q in test_questions)  # test never leaks into the choice


def test_select_on_dev_without_enough_train_is_an_error(yesno, tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in YESNO_TRAIN[:8]))
    with pytest.raises(TaskfitError, match="needs a dev split"):
        taskfit.run(yesno(TEMPLATES + "combine: select_on_dev"), out=tmp_path / "out", lm=ScriptedLM())


def test_contextual_calibration_removes_a_label_bias(yesno, tmp_path):
    def biased(r):  # 'yes' is favoured by 1.5 nats everywhere; the content shifts it by ±1
        base = -1.0 if r.continuation.strip() == "yes" else -2.5
        if "N/A" in r.context or r.context.rstrip().endswith("Q:\nA:") or "[MASK]" in r.context:
            return base
        right = "yes" if ("fire" in r.context or "snow" in r.context) else "no"
        return base + (1.0 if r.continuation.strip() == right else 0.0)

    plain = yesno('template: "Q: {{ question }}\\nA: {{ answer }}"')
    taskfit.run(plain, out=tmp_path / "plain", lm=ScriptedLM(score=biased))
    assert [r["prediction"] for r in rows_of(tmp_path / "plain")] == ["yes", "yes", "yes"]
    calibrated = yesno('template: "Q: {{ question }}\\nA: {{ answer }}"\ncalibrate: contextual')
    results = taskfit.run(calibrated, out=tmp_path / "cal", lm=ScriptedLM(score=biased))
    rows = rows_of(tmp_path / "cal")
    assert [r["prediction"] for r in rows] == ["yes", "no", "yes"]
    assert rows[0]["content_free_probabilities"][1] > 0.7  # the bias the calibration divided out
    assert 0 <= results["r"]["ece"] <= 1


def test_calibration_divides_tiny_content_free_probabilities_exactly():
    """Multi-token options get content-free probabilities far below 1e-12 (log -19 to -125 on a
    tiny model); the division runs in log space, so no floor decides the prediction."""
    from taskfit.prompting.strategy import calibrated, softmax

    ranked = [-2.0, -6.0, -7.0]  # option 0 is the model's choice
    free = [[-1.0, -90.0, -91.0], [-1.5, -95.0, -96.0]]  # ... and overwhelmingly the content-free one
    probs, p_cf = calibrated(ranked, free)
    expected = []
    for k in range(3):  # Zhao et al.: p / mean content-free p, renormalized (in float64 log space)
        cf = math.log(sum(math.exp(s[k] - max(s)) / sum(math.exp(x - max(s)) for x in s) for s in free) / 2)
        expected.append(math.log(softmax(ranked)[k]) - cf)
    assert probs == pytest.approx(softmax(expected), rel=1e-9)
    # options 1 and 2 trail by the same nat with and without content: calibrated, they are even
    # (divided by a floor of 1e-12 instead, option 1 got 0.73 and option 2 0.27)
    assert probs[1] == pytest.approx(probs[2], rel=1e-6)
    assert p_cf[0] == pytest.approx(1.0) and 0 < p_cf[1] < 1e-30


def test_a_spread_is_over_templates_or_demo_sets_at_each_number_of_shots(yesno, tmp_path):
    results = taskfit.run(
        yesno('template: "Q: {{ question }}\\nA: {{ answer }}"\nshots: [1, 2]\ndemos: random\ndemo_sets: 2'),
        out=tmp_path / "out",
        lm=ScriptedLM(),
    )
    assert results["r[k1]"]["variants"] == ["r[k1-d0]", "r[k1-d1]"]
    assert results["r[k2]"]["variants"] == ["r[k2-d0]", "r[k2-d1]"] and "r" not in results
    (tmp_path / "two.yaml").write_text(
        (tmp_path / "exp.yaml").read_text()
        + '  other:\n    prompt:\n      template: "Q: {{ question }} {{ answer }}"\n'
    )
    taskfit.run(tmp_path / "two.yaml", out=tmp_path / "out", lm=ScriptedLM(), only=["other"])
    kept = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"r[k1]", "r[k2]", "other"} <= set(kept)  # a run not run now keeps its spreads


def test_demo_sets_redraw_demonstrations(yesno, tmp_path):
    lm = ScriptedLM()
    results = taskfit.run(
        yesno('template: "Q: {{ question }}\\nA: {{ answer }}"\nshots: 2\ndemos: random\ndemo_sets: 3'),
        out=tmp_path / "out",
        lm=lm,
    )
    assert results["r"]["variants"] == ["r[d0]", "r[d1]", "r[d2]"]
    prompts = {rows_of(tmp_path / "out", f"r/d{d}")[0]["prompt"] for d in range(3)}
    assert len(prompts) == 3


def test_no_demo_set_of_one_seed_redraws_another_seeds():
    """With seeds and demo_sets together, every (seed, set) draws its own demonstrations: seed * 7919
    + set made set 1 of seed 0 the draw of set 0 of seed 1."""
    from taskfit.cell import Cell
    from taskfit.config import ModelConfig

    def cell(seed, demo_set=None):
        return Cell("r", ModelConfig(), seed, "r", "r", demo_set=demo_set)

    seeds = {cell(s, d).demo_seed for s in range(50) for d in (None, 1, 2, 3)}
    assert len(seeds) == 200 and cell(3).demo_seed == 3  # set 0 keeps the run's own seed


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (
            'template: "Q: {{ question }}\\nA: {{ answer }}"\ncalibrate: contextual\nchain_of_thought: true',
            "contextual calibration",
        ),
        (TEMPLATES + "chain_of_thought: true", "`combine: each` or `select_on_dev`"),
    ],
)
def test_toolbox_conflicts_are_clear_errors(yesno, prompt, message):
    with pytest.raises(TaskfitError, match=re.escape(message)):
        taskfit.experiment.plan(yesno(prompt))


def test_cot_demo_without_rationale_names_the_row(yesno, tmp_path):
    rows = [{"id": "t1", "question": "x?", "answer": "yes"}, {"id": "t2", "question": "y?", "answer": "no"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskfitError, match="rationale"):
        taskfit.experiment.plan(
            yesno('template: "Q: {{ question }}\\nA: {{ answer }}"\nshots: 1\nchain_of_thought: true')
        )


def test_spread_over_templates_and_seeds_splits_the_variance(yesno, tmp_path):
    path = yesno(TEMPLATES + "combine: each\nshots: 1\ndemos: random", extra="seeds: [0, 1, 2]\n")
    results = taskfit.run(path, out=tmp_path / "out", lm=ScriptedLM(score=_template_bias))
    shares = results["r"]["variance_shares"]["accuracy"]
    assert set(shares) == {"variant", "seed", "residual"}
    assert shares["variant"] + shares["seed"] + shares["residual"] == pytest.approx(1.0)
    assert shares["variant"] > 0.5  # the templates differ far more than the demo draws here


def test_report_shows_the_spread_section(yesno, tmp_path):
    from taskfit.report import write_report

    path = yesno(TEMPLATES + "combine: each", extra="seeds: [0, 1]\n")
    taskfit.run(path, out=tmp_path / "out", lm=ScriptedLM(score=_template_bias))
    html = write_report(tmp_path / "out").read_text()
    assert 'id="spread"' in html and "share of variance" in html and "variant 100%" in html


def test_a_list_of_shots_gives_one_cell_per_count_and_a_learning_curve(yesno, tmp_path):
    from taskfit.report import write_report

    lm = ScriptedLM()
    results = taskfit.run(
        yesno('template: "Q: {{ question }}\\nA: {{ answer }}"\nshots: [0, 2, 4]'), out=tmp_path / "out", lm=lm
    )
    assert list(results) == ["r[k0]", "r[k2]", "r[k4]"]  # settings, not variants: no mean over them
    prompts = [rows_of(tmp_path / "out", f"r/k{k}")[0]["prompt"] for k in (0, 2, 4)]
    assert [p.count("Q:") for p in prompts] == [1, 3, 5]
    manifest = json.loads((tmp_path / "out" / "r" / "k2" / "manifest.json").read_text())
    assert manifest["config"]["prompt"]["shots"] == 2
    assert 'id="learning-curve"' in write_report(tmp_path / "out").read_text()


def test_generation_rows_say_whether_they_are_correct(tmp_path):
    """`correct` (an exact match of a reference, normalized) is what paired tests and the report's
    wrong-predictions section read; generation rows lacked it."""
    rows = [{"id": "a", "q": "France?", "target": "Paris"}, {"id": "b", "q": "Italy?", "target": ["Rome", "Roma"]}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "exp.yaml").write_text(
        "name: g\ntask: {type: generation, data: {test: test.jsonl}, label: target}\n"
        'runs:\n  r:\n    prompt: {template: "Q: {{ q }}\\nA: {{ answer }}"}\n'
    )
    lm = ScriptedLM(script=lambda ctx, s, seed: " the Paris." if "France" in ctx else " Milan")
    taskfit.run(tmp_path / "exp.yaml", out=tmp_path / "out", lm=lm)
    assert [r["correct"] for r in rows_of(tmp_path / "out")] == [True, False]


def test_on_a_generation_task_extract_gives_the_answer_and_an_unmatched_text_answers_whole(tmp_path):
    rows = [{"id": "a", "q": "France?", "target": "Paris"}, {"id": "b", "q": "Italy?", "target": "Rome"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "exp.yaml").write_text(
        "name: g\ntask: {type: generation, data: {test: test.jsonl}, label: target}\n"
        'runs:\n  r:\n    prompt: {template: "Q: {{ q }}\\nA: {{ answer }}", extract: "capital is (\\\\w+)"}\n'
    )
    lm = ScriptedLM(script=lambda ctx, s, seed: " Its capital is Paris." if "France" in ctx else " Rome ")
    results = taskfit.run(tmp_path / "exp.yaml", out=tmp_path / "out", lm=lm)
    got = rows_of(tmp_path / "out")
    assert [r["prediction"] for r in got] == ["Paris", "Rome"]
    assert [r["extraction_failed"] for r in got] == [0.0, 1.0]
    assert results["r"]["extraction_failed"] == 0.5
