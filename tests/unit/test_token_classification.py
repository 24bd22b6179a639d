"""Token classification: reading and checking rows, entity metrics against seqeval, the
entity-line parser, and a full prompt run with a scripted LM."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

import taskfit
from taskfit.errors import TaskfitError
from taskfit.evaluation.token_metrics import paired_comparison, scores_from_counts, sentence_counts, token_metrics
from taskfit.prompting.entities import entity_lines, parse_entities
from taskfit.tasks.token_classification import encode, entity_types, spans, tag_scheme

TRAIN = [
    {
        "id": "t1",
        "tokens": ["John", "Smith", "lives", "in", "Paris", "."],
        "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O"],
    },
    {"id": "t2", "tokens": ["It", "rained", "."], "tags": ["O", "O", "O"]},
    {"id": "t3", "tokens": ["Maria", "works", "at", "Google", "."], "tags": ["B-PER", "O", "O", "B-ORG", "O"]},
    {
        "id": "t4",
        "tokens": ["The", "United", "Nations", "met", "in", "New", "York", "."],
        "tags": ["O", "B-ORG", "I-ORG", "O", "O", "B-LOC", "I-LOC", "O"],
    },
]
TEST = [
    {"id": "s1", "tokens": ["Anna", "visited", "New", "York", "."], "tags": ["B-PER", "O", "B-LOC", "I-LOC", "O"]},
    {
        "id": "s2",
        "tokens": ["Paris", "is", "far", "from", "Paris", "Texas"],
        "tags": ["B-LOC", "O", "O", "O", "B-LOC", "I-LOC"],
    },
    {"id": "s3", "tokens": ["Nothing", "happened", "."], "tags": ["O", "O", "O"]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def ner(tmp_path):
    """Writes train/test files and an experiment; returns the experiment's path."""

    def make(train=TRAIN, test=TEST, task_extra="", runs=None):
        write_jsonl(tmp_path / "train.jsonl", train)
        write_jsonl(tmp_path / "test.jsonl", test)
        runs = runs or '  r:\n    prompt:\n      template: "Sentence: {{ text }}\\nEntities: {{ answer }}"\n'
        text = (
            "name: ner\ntask:\n  type: token_classification\n  data: {train: train.jsonl, test: test.jsonl}\n"
            f"  tokens: tokens\n  label: tags\n{task_extra}runs:\n{runs}"
        )
        (tmp_path / "exp.yaml").write_text(text)
        return tmp_path / "exp.yaml"

    return make


# ---------------------------------------------------------------- reading and checking


def test_task_reads_tokens_tags_and_orders_the_tag_set(ner):
    task = taskfit.load_task(ner())
    assert task.tags == ("O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER")
    assert task.metrics[0] == "entity_f1"
    ex = task.split("test")[0]
    assert ex.options == task.tags and ex.gold == 0
    assert ex.fields["tokens"] == ["Anna", "visited", "New", "York", "."]
    assert ex.fields["tags"] == ["B-PER", "O", "B-LOC", "I-LOC", "O"]
    assert ex.fields["text"] == "Anna visited New York ."


def test_a_test_tag_missing_from_the_train_tag_set_is_an_error(ner):
    test = [*TEST, {"id": "s4", "tokens": ["Bob", "likes", "Linux"], "tags": ["B-PER", "O", "B-MISC"]}]
    with pytest.raises(
        TaskfitError,
        match=r"test.jsonl:4: tag 'B-MISC' of token 2 \('Linux'\) in field 'tags' is not in the tags "
        "of the train split",
    ):
        taskfit.load_task(ner(test=test))


def test_given_tags_set_the_order_and_reject_other_tags(ner):
    tags = "  tags: [O, B-PER, I-PER, B-LOC, I-LOC, B-ORG, I-ORG]\n"
    task = taskfit.load_task(ner(task_extra=tags))
    assert task.tags == ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")
    bad = [*TRAIN, {"id": "t9", "tokens": ["Bob"], "tags": ["B-MISC"]}]
    with pytest.raises(TaskfitError, match=r"train.jsonl:5: tag 'B-MISC' .* not in `task.tags`"):
        taskfit.load_task(ner(train=bad, task_extra=tags))
    with pytest.raises(TaskfitError, match="task.tags: the tag set lists 'O' more than once"):
        taskfit.load_task(ner(task_extra="  tags: [O, B-PER, O]\n"))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, r"train.jsonl:1: 2 tokens in 'tokens' but 1 tags in 'tags'"),
        ({"tokens": [], "tags": []}, r"train.jsonl:1: field 'tokens' has no tokens"),
        ({"tokens": ["a", 3], "tags": ["O", "O"]}, r"train.jsonl:1: field 'tokens' item 1 must be a non-empty string"),
        ({"tokens": ["a", " "], "tags": ["O", "O"]}, r"field 'tokens' item 1 must be a non-empty string, got an empty"),
        ({"tokens": {"a": 1}, "tags": ["O"]}, r"train.jsonl:1: field 'tokens' must be a list of tokens"),
        ({"tokens": '["a", ', "tags": ["O"]}, r"train.jsonl:1: field 'tokens' looks like a JSON list"),
        ({"words": ["a"], "tags": ["O"]}, r"train.jsonl:1: this row has no field 'tokens'"),
    ],
)
def test_malformed_rows_name_the_line_and_the_field(ner, row, message):
    with pytest.raises(TaskfitError, match=message):
        taskfit.load_task(ner(train=[{"id": "x", **row}, *TRAIN]))


def test_strings_are_json_lists_or_whitespace_separated(tmp_path):
    (tmp_path / "test.csv").write_text('id,tokens,tags\na,"[""Anna"", ""Lee""]",B-PER I-PER\n', encoding="utf-8")
    (tmp_path / "exp.yaml").write_text(
        "name: n\ntask: {type: token_classification, data: {test: test.csv}, tokens: tokens, label: tags}\n"
        'runs: {r: {prompt: {template: "{{ text }}: {{ answer }}"}}}\n'
    )
    task = taskfit.load_task(tmp_path / "exp.yaml")
    ex = task.split("test")[0]
    assert ex.fields["tokens"] == ["Anna", "Lee"] and ex.fields["tags"] == ["B-PER", "I-PER"]
    assert task.tags == ("B-PER", "I-PER")  # no train split: the test split's tags


def test_mixed_prefixed_and_plain_tags_are_an_error(ner):
    mixed = [{"id": "m", "tokens": ["Bob", "Rome"], "tags": ["B-PER", "LOC"]}]
    with pytest.raises(TaskfitError, match="the tags of the train split: mixes prefixed tags"):
        taskfit.load_task(ner(train=mixed, test=mixed))


def test_a_row_text_field_wins_over_the_joined_tokens(ner):
    rows = [{"id": "a", "tokens": ["Bob", "'s"], "tags": ["B-PER", "O"], "text": "Bob's"}]
    task = taskfit.load_task(ner(train=rows, test=rows))
    assert task.split("test")[0].fields["text"] == "Bob's"


def test_a_tokens_field_named_text_still_renders_as_the_sentence(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"text": "Bob sings", "tags": "B-PER O"}])
    (tmp_path / "exp.yaml").write_text(
        "name: n\ntask: {type: token_classification, data: {test: test.jsonl}, tokens: text, label: tags}\n"
        'runs: {r: {prompt: {template: "S: {{ text }}\\nE: {{ answer }}"}}}\n'
    )
    lm = ScriptedLM(lambda ctx: " Bob: PER")  # the template's space before the answer: generated, not prompted
    results = taskfit.run(tmp_path / "exp.yaml", out=tmp_path / "out", lm=lm)
    assert lm.generated[0].context == "S: Bob sings\nE:"
    assert results["r"]["entity_f1"] == 1.0


def test_tag_schemes_and_encoding():
    assert tag_scheme(["O", "B-PER", "I-PER"]) == "bio"
    assert tag_scheme(["O", "I-PER"]) == "io"
    assert tag_scheme(["O", "S-PER", "B-PER", "E-PER"]) == "iobes"
    assert tag_scheme(["O", "PER", "LOC"]) == "plain"
    assert entity_types(["O", "B-PER", "I-PER", "B-LOC"]) == ["PER", "LOC"]
    found = [("PER", 0, 1), ("LOC", 3, 3)]
    assert encode(found, 4, "bio") == ["B-PER", "I-PER", "O", "B-LOC"]
    assert encode(found, 4, "io") == ["I-PER", "I-PER", "O", "I-LOC"]
    assert encode(found, 4, "iobes") == ["B-PER", "E-PER", "O", "S-LOC"]
    assert encode(found, 4, "plain") == ["PER", "PER", "O", "LOC"]
    for scheme in ("bio", "io", "iobes", "plain"):
        assert spans(encode(found, 4, scheme)) == found
    assert spans(["PER", "PER", "O", "LOC", "LOC"]) == [("PER", 0, 1), ("LOC", 3, 4)]  # plain = IO


def test_bio_tags_used_as_iob1_are_written_as_iob1():
    """Data whose entities start with I- (IOB1: B- only right after an entity of the same type)
    gets its predictions in IOB1, so token accuracy compares like with like."""
    from types import SimpleNamespace

    from taskfit.tasks.token_classification import task_scheme

    found = [("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4)]
    assert encode(found, 5, "iob1") == ["I-PER", "I-PER", "O", "I-LOC", "B-LOC"]
    assert spans(encode(found, 5, "iob1")) == found

    def task(*sequences):
        examples = [SimpleNamespace(fields={"tags": list(t)}) for t in sequences]
        config = SimpleNamespace(label="tags")
        return SimpleNamespace(tags=("O", "B-LOC", "I-LOC", "I-PER"), config=config, split=lambda s: examples)

    assert task_scheme(task(["I-PER", "I-PER", "O", "I-LOC", "B-LOC"])) == "iob1"
    assert task_scheme(task(["B-PER", "I-PER", "O", "B-LOC"])) == "bio"


# ---------------------------------------------------------------- metrics


GOLD = [
    ["B-PER", "I-PER", "O", "B-LOC"],
    ["O", "B-ORG", "I-ORG", "O", "B-PER"],
    ["O", "O"],
    ["B-LOC", "O", "B-LOC", "I-LOC"],
]
PRED = [
    ["B-PER", "I-PER", "O", "B-ORG"],  # one right, one wrong type
    ["O", "I-ORG", "I-ORG", "O", "O"],  # ill-formed start still decodes (default mode); one missed
    ["B-PER", "O"],  # spurious
    ["B-LOC", "O", "B-LOC", "O"],  # boundary error
]


def test_entity_metrics_equal_seqeval_default_mode():
    m = token_metrics(GOLD, PRED, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["entity_precision"] == pytest.approx(precision_score(GOLD, PRED))
        assert m["entity_recall"] == pytest.approx(recall_score(GOLD, PRED))
        assert m["entity_f1"] == pytest.approx(f1_score(GOLD, PRED))
    assert m["token_accuracy"] == pytest.approx(accuracy_score(GOLD, PRED))
    assert m["n"] == 4 and (m["entity_precision"], m["entity_recall"]) == (pytest.approx(3 / 6), pytest.approx(3 / 6))
    for name in ("entity_f1", "entity_precision", "entity_recall", "token_accuracy"):
        low, high = m[f"{name}_ci95"]
        assert low <= m[name] <= high
    assert token_metrics(GOLD, PRED, seed=0) == m  # seeded


def test_counts_reproduce_seqeval_on_any_resample_of_sentences():
    rng = np.random.default_rng(3)
    gold = GOLD * 5
    pred = PRED * 5
    counts = sentence_counts(gold, pred)
    for _ in range(5):
        idx = rng.integers(0, len(gold), size=len(gold))
        scores = scores_from_counts(counts[idx].sum(axis=0))
        g, p = [gold[i] for i in idx], [pred[i] for i in idx]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert scores["entity_f1"] == pytest.approx(f1_score(g, p))
            assert scores["entity_precision"] == pytest.approx(precision_score(g, p))
        assert scores["token_accuracy"] == pytest.approx(accuracy_score(g, p))


def test_metrics_edge_cases():
    perfect = token_metrics(GOLD, GOLD)
    assert perfect["entity_f1"] == 1.0 and perfect["entity_f1_ci95"] == [1.0, 1.0]
    empty = token_metrics([["O", "O"]], [["O", "O"]])
    assert empty["entity_f1"] == 0.0 and empty["token_accuracy"] == 1.0  # seqeval: undefined -> 0
    plain = token_metrics([["PER", "PER", "O"]], [["PER", "O", "O"]])
    assert plain["entity_f1"] == 0.0 and plain["token_accuracy"] == pytest.approx(2 / 3)
    iobes = token_metrics([["B-PER", "E-PER", "S-LOC"]], [["B-PER", "E-PER", "O"]])
    assert iobes["entity_precision"] == 1.0 and iobes["entity_recall"] == 0.5
    with pytest.raises(ValueError, match="2 predicted tags for 3 gold tags"):
        token_metrics([["O", "O", "O"]], [["O", "O"]])


def test_paired_comparison_of_two_taggers():
    gold, a = GOLD * 10, PRED * 10
    same = paired_comparison(gold, a, a, seed=0)
    assert same["entity_f1"]["difference"] == 0.0 and same["entity_f1"]["p_value"] == 1.0
    better = paired_comparison(gold, gold, a, seed=0)["entity_f1"]
    assert better["a_value"] == 1.0 and better["b_value"] == pytest.approx(f1_score(gold, a))
    assert better["difference"] > 0 and better["ci95"][0] > 0 and better["p_value"] < 0.01
    more = paired_comparison(gold, gold, a, resamples=200, permutations=4999, seed=0)["entity_f1"]
    assert more["p_value"] == pytest.approx(1 / 5000)  # (1 + 0 extreme) / (1 + permutations)
    assert more["ci95"] != better["ci95"]  # its own 200 bootstrap draws


# ---------------------------------------------------------------- parsing entity lines

TYPES = ["PER", "LOC", "ORG"]


def test_parse_multi_token_spans_and_repeated_words():
    tokens = ["Paris", "is", "far", "from", "Paris", "Texas", "and", "New", "York"]
    one = parse_entities("Paris: LOC\nNew York: LOC", tokens, TYPES)
    assert one.spans == [("LOC", 0, 0), ("LOC", 7, 8)] and one.failed == 0.0
    two = parse_entities("Paris: LOC\nParis Texas: LOC\nparis: loc", tokens, TYPES)
    assert two.spans == [("LOC", 0, 0), ("LOC", 4, 5)]  # the third `Paris` line finds no unused one
    assert two.unparsed == ["paris: loc"] and two.failed == pytest.approx(1 / 3)


@pytest.mark.parametrize("answer", ["Paris: LOC\nParis Hilton: PER", "Paris Hilton: PER\nParis: LOC"])
def test_parse_places_the_longest_spans_first_whatever_the_line_order(answer):
    parsed = parse_entities(answer, ["Paris", "Hilton", "visited", "Paris", "."], TYPES)
    assert parsed.spans == [("PER", 0, 1), ("LOC", 3, 3)] and parsed.unparsed == []


def test_parse_counts_unknown_types_missing_colons_and_unmatched_spans():
    tokens = ["Bob", "met", "Alice", "."]
    parsed = parse_entities("Bob: PER\nAlice: ANIMAL\nCarol: PER\njust text\n- Alice: PER", tokens, TYPES)
    assert parsed.spans == [("PER", 0, 0), ("PER", 2, 2)]
    assert parsed.unparsed == ["Alice: ANIMAL", "Carol: PER", "just text"] and parsed.failed == pytest.approx(3 / 5)


def test_parse_none_and_empty_output_name_no_entity():
    for text in ("none", "None.", "", "\n \n"):
        parsed = parse_entities(text, ["It", "rained"], TYPES)
        assert parsed.spans == [] and parsed.lines == 0 and parsed.failed == 0.0


def test_parse_is_case_unicode_whitespace_and_punctuation_tolerant():
    tokens = ["José", "moved", "to", "Zürich", "'s", "old", "town", "near", "the", "U.S.", "border", "."]
    text = "JOSE\u0301: per\n* zürich's: **LOC**\nＵ.Ｓ.: LOC\n1. town.: LOC"
    parsed = parse_entities(text, tokens, TYPES)
    assert parsed.spans == [("PER", 0, 0), ("LOC", 3, 4), ("LOC", 6, 6), ("LOC", 9, 9)]
    assert parsed.failed == 0.0
    assert parse_entities("Paris.: LOC", ["Paris", "."], TYPES).spans == [("LOC", 0, 0)]


def test_entity_lines_show_gold_entities_or_none():
    assert entity_lines(["New", "York", "and", "Bob"], ["B-LOC", "I-LOC", "O", "B-PER"]) == "New York: LOC\nBob: PER"
    assert entity_lines(["It", "rained"], ["O", "O"]) == "none"


# ---------------------------------------------------------------- a full prompt run


class ScriptedLM:
    """Generations from `script(context)`; no scoring is expected."""

    def __init__(self, script):
        self.identity = {"name": "scripted", "dtype": "float32", "device": "cpu"}
        self.script = script
        self.generated = []

    def generate(self, requests):
        self.generated.extend(requests)
        return [[self.script(r.context) for _ in range(r.samples)] for r in requests]

    def loglikelihood(self, requests):
        raise AssertionError("token classification prompts do not score options")

    def chat(self, text):
        return f"<user>{text}</user><assistant>"


ANSWERS = {
    "Anna visited New York .": "Anna: PER\nNew York: LOC",
    "Paris is far from Paris Texas": "Paris: LOC\nParis Texas: ORG\nTexas: PLANET",
    "Nothing happened .": "none",
}


def answer_for(context: str) -> str:
    sentence = context.rsplit("Sentence: ", 1)[1].split("\n", 1)[0]
    return ANSWERS[sentence]


def test_prompt_run_predicts_tags_and_reports_entity_metrics(ner, tmp_path):
    tags = "  tags: [O, B-PER, I-PER, B-LOC, I-LOC, B-ORG, I-ORG]\n"
    runs = (
        '  r:\n    prompt:\n      template: "Sentence: {{ text }}\\nEntities: {{ answer }}"\n'
        "      shots: 2\n      max_new_tokens: 40\n"
    )
    lm = ScriptedLM(answer_for)
    results = taskfit.run(ner(task_extra=tags, runs=runs), out=tmp_path / "out", lm=lm)

    request = lm.generated[0]
    assert request.context.startswith(
        "Sentence: John Smith lives in Paris .\nEntities: John Smith: PER\nParis: LOC\n\n"
        "Sentence: It rained .\nEntities: none\n\n"
    )
    assert request.context.endswith("Sentence: Anna visited New York .\nEntities:")  # the space is generated
    assert request.stop == ("\n\n", "\nSentence:") and request.temperature == 0 and request.samples == 1

    rows = [json.loads(line) for line in (tmp_path / "out" / "r" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["s1", "s2", "s3"]
    assert rows[0]["prediction"] == ["B-PER", "O", "B-LOC", "I-LOC", "O"] and rows[0]["correct"] is True
    assert rows[1]["prediction"] == ["B-LOC", "O", "O", "O", "B-ORG", "I-ORG"] and rows[1]["correct"] is False
    assert rows[1]["unparsed"] == ["Texas: PLANET"] and rows[1]["parse_failed"] == pytest.approx(1 / 3)
    assert rows[2]["prediction"] == ["O", "O", "O"] and rows[2]["generations"] == ["none"]
    assert rows[0]["label"] == ["B-PER", "O", "B-LOC", "I-LOC", "O"] and "prompt" in rows[0]

    r = results["r"]
    assert r["entity_precision"] == pytest.approx(3 / 4) and r["entity_recall"] == pytest.approx(3 / 4)
    assert r["entity_f1"] == pytest.approx(3 / 4) and len(r["entity_f1_ci95"]) == 2
    assert r["token_accuracy"] == pytest.approx(12 / 14) and len(r["token_accuracy_ci95"]) == 2
    assert r["parse_failed"] == pytest.approx(1 / 9)
    manifest = json.loads((tmp_path / "out" / "r" / "manifest.json").read_text())
    assert manifest["metrics"]["entity_f1"] == r["entity_f1"]

    from taskfit.report import write_report

    assert write_report(tmp_path / "out").is_file()


def test_chat_prompts_and_unsupported_settings(ner, tmp_path):
    tags = "  tags: [O, B-PER, I-PER, B-LOC, I-LOC, B-ORG, I-ORG]\n"
    chat = '  r:\n    prompt:\n      template: "Sentence: {{ text }}\\nEntities: {{ answer }}"\n      chat: true\n'
    lm = ScriptedLM(lambda ctx: "none")
    taskfit.run(ner(task_extra=tags, runs=chat), out=tmp_path / "out", lm=lm)
    assert lm.generated[0].context == "<user>Sentence: Anna visited New York .\nEntities:</user><assistant>"

    template = '  r:\n    prompt:\n      template: "S: {{ text }} E: {{ answer }}"\n'
    for extra, key in [
        ("      chain_of_thought: true\n", "chain_of_thought"),
        ('      extract: "(.*)"\n', "extract"),
        ("      answers: {O: other}\n", "answers"),
        ('      separator: "\\n"\n', "separator"),
    ]:
        with pytest.raises(TaskfitError, match=rf"runs\.r\.prompt\.{key}:"):
            taskfit.experiment.plan(ner(task_extra=tags, runs=template + extra))
    ensemble = '  r:\n    prompt:\n      templates: ["A {{ text }} {{ answer }}", "B {{ text }} {{ answer }}"]\n'
    with pytest.raises(TaskfitError, match=r"runs\.r\.prompt\.combine: `mean_prob`"):
        taskfit.experiment.plan(ner(task_extra=tags, runs=ensemble))
