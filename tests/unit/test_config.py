"""The experiment file schema: strict keys with line numbers and did-you-mean, clear type errors."""

from __future__ import annotations

import re

import pytest

from taskfit import TaskfitError, load_experiment
from taskfit.config import DEFAULT_MODEL


def error_of(path) -> str:
    with pytest.raises(TaskfitError) as info:
        load_experiment(path)
    return str(info.value)


def test_valid_file_loads(project):
    exp = load_experiment(project / "mc.yaml")
    cfg = exp.config
    assert cfg.name == "mc"
    assert cfg.task.type == "multiple_choice"
    assert cfg.task.choices == "choices"
    assert cfg.task.label == "answer"
    assert cfg.task.data.train == "mc_train.jsonl"
    assert cfg.model_list[0].name == DEFAULT_MODEL
    assert list(cfg.runs) == ["zero"]
    prompt = cfg.runs["zero"].prompt
    assert prompt.template == "Question: {{ question }}\nAnswer: {{ answer }}"
    assert (prompt.shots, prompt.demos, prompt.normalize, prompt.answer_pooling, prompt.chat) == (
        0,
        "first",
        "none",
        "logsumexp",
        False,
    )
    assert exp.root == project.resolve()


def test_full_prompt_options_load(write_yaml):
    path = write_yaml("""\
        name: full
        seed: 7
        task:
          type: classification
          data: {train: cls_train.csv, test: cls_small.csv}
          labels: [positive, negative, neutral]
        model: {name: smollm2-135m-instruct, dtype: float32, device: cpu, batch_tokens: 512}
        runs:
          few:
            prompt:
              template: "{{ text }} => {{ answer }}"
              answers: {positive: [great, good], negative: bad}
              answer_pooling: mean
              shots: 3
              demos: balanced
              separator: "\\n---\\n"
              normalize: length
              chat: true
        """)
    cfg = load_experiment(path).config
    assert cfg.seed == 7
    assert cfg.task.labels == ["positive", "negative", "neutral"]
    assert cfg.model.batch_tokens == 512
    p = cfg.runs["few"].prompt
    assert p.answers == {"positive": ["great", "good"], "negative": "bad"}
    assert (p.answer_pooling, p.shots, p.demos, p.separator, p.normalize, p.chat) == (
        "mean",
        3,
        "balanced",
        "\n---\n",
        "length",
        True,
    )


BASE = """\
name: exp
task:
  type: multiple_choice
  data:
    test: mc_small.jsonl
  choices: choices
  label: answer
model:
  name: smollm2-135m-instruct
runs:
  zero:
    prompt:
      template: "Q: {{ question }} A: {{ answer }}"
      shots: 0
"""


@pytest.mark.parametrize(
    ("old", "new", "line", "key", "suggestion"),
    [
        ("name: exp", "name: exp\nsed: 3", 2, "sed", "seed"),
        ("  label: answer", "  label: answer\n  chioces: x", 8, "task.chioces", "choices"),
        ("    test: mc_small.jsonl", "    test: mc_small.jsonl\n    trian: x.jsonl", 6, "task.data.trian", "train"),
        (
            "  name: smollm2-135m-instruct",
            "  name: smollm2-135m-instruct\n  dtpye: float32",
            10,
            "model.dtpye",
            "dtype",
        ),
        ("      shots: 0", "      shots: 0\n      normalise: length", 15, "runs.zero.prompt.normalise", "normalize"),
        ("      template:", "      tempalte:", 13, "runs.zero.prompt.tempalte", "template"),
        ("    prompt:", "    promt:", 12, "runs.zero.promt", "prompt"),
    ],
)
def test_unknown_key_names_line_and_suggestion(write_yaml, old, new, line, key, suggestion):
    assert old in BASE
    message = error_of(write_yaml(BASE.replace(old, new, 1)))
    first = [m for m in message.splitlines() if "unknown key" in m]
    assert first, message
    assert f", line {line}:" in first[0], message
    assert f"`{key}`" in first[0], message
    assert f"Did you mean '{suggestion}'?" in first[0], message


def test_unknown_key_names_the_file(write_yaml):
    path = write_yaml(BASE.replace("name: exp", "name: exp\nsed: 3"))
    assert str(path) in error_of(path)


def test_unknown_key_far_from_any_valid_key_lists_valid_keys(write_yaml):
    message = error_of(write_yaml(BASE.replace("name: exp", "name: exp\nxyzzy: 1")))
    assert "Did you mean" not in message
    assert "Valid keys here:" in message
    for key in ("model", "name", "runs", "seed", "task"):
        assert key in message.split("Valid keys here:")[1]


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("    test: mc_small.jsonl\n", "    train: mc_small.jsonl\n", "task.data.test"),
        ("name: exp\n", "", "name"),
    ],
)
def test_missing_required_field(write_yaml, old, new, field):
    assert old in BASE
    message = error_of(write_yaml(BASE.replace(old, new, 1)))
    assert f"`{field}` is required but missing" in message


def test_missing_runs(write_yaml):
    message = error_of(write_yaml(BASE.split("runs:")[0]))
    assert "`runs` is required but missing" in message


def test_wrong_type_names_field_line_and_value(write_yaml):
    message = error_of(write_yaml(BASE.replace("shots: 0", 'shots: "five"')))
    assert "runs.zero.prompt.shots" in message
    assert "line 14" in message
    assert "'five'" in message


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("shots: 0", "shots: -1", "runs.zero.prompt.shots"),
        ("shots: 0", "shots: 1\n      demos: stratified", "runs.zero.prompt.demos"),
        ("type: multiple_choice", "type: regression", "task.type"),
        ("  name: smollm2-135m-instruct", "  name: smollm2-135m-instruct\n  dtype: float16", "model.dtype"),
    ],
)
def test_invalid_values_name_the_field(write_yaml, old, new, field):
    message = error_of(write_yaml(BASE.replace(old, new, 1)))
    assert f"`{field}`" in message


def test_invalid_yaml_reports_line(write_yaml):
    path = write_yaml("name: exp\ntask:\n  type: [multiple_choice\n  data: x\n")
    message = error_of(path)
    assert "not valid YAML" in message
    assert re.search(r"line \d+", message)


def test_yaml_that_is_not_a_mapping(write_yaml):
    assert "expected a mapping" in error_of(write_yaml("- just\n- a list\n"))


def test_missing_experiment_file(tmp_path):
    message = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in message
    assert "no such experiment file" in message


@pytest.mark.parametrize("name", ["has space", "slash/name", ".hidden"])
def test_bad_run_name(write_yaml, name):
    message = error_of(write_yaml(BASE.replace("  zero:", f"  '{name}':")))
    assert f"run name '{name}'" in message
    assert "line 10" in message  # the `runs:` key


def test_bad_experiment_name(write_yaml):
    message = error_of(write_yaml(BASE.replace("name: exp", "name: my exp")))
    assert "`name`" in message
    assert "line 1" in message


def test_empty_runs(write_yaml):
    message = error_of(write_yaml(BASE.split("runs:")[0] + "runs: {}\n"))
    assert "`runs`" in message


def test_choices_on_classification_is_an_error(write_yaml):
    text = BASE.replace("type: multiple_choice", "type: classification")
    message = error_of(write_yaml(text))
    assert "`choices` only applies to multiple_choice tasks" in message
    assert "line 2" in message  # the `task:` key


def test_multiple_choice_without_choices_is_an_error(write_yaml):
    message = error_of(write_yaml(BASE.replace("  choices: choices\n", "")))
    assert "multiple_choice tasks need `choices`" in message


def test_labels_on_multiple_choice_is_an_error(write_yaml):
    message = error_of(write_yaml(BASE.replace("  label: answer", "  label: answer\n  labels: [a, b]")))
    assert "`labels` only applies to classification tasks" in message


def test_duplicate_labels_is_an_error(write_yaml):
    text = BASE.replace("type: multiple_choice", "type: classification").replace("  choices: choices\n", "")
    message = error_of(write_yaml(text.replace("  label: answer", "  label: answer\n  labels: [a, b, a]")))
    assert "lists a label twice" in message


def test_choices_as_list_of_fields_loads(write_yaml):
    cfg = load_experiment(write_yaml(BASE.replace("choices: choices", "choices: [a, b, c]"))).config
    assert cfg.task.choices == ["a", "b", "c"]


def test_duplicate_run_name_is_an_error(write_yaml):
    """A copied run whose name was not changed must not silently replace the first one."""
    text = BASE + '  zero:\n    prompt:\n      template: "{{ question }} {{ answer }}"\n'
    with pytest.raises(TaskfitError) as info:
        load_experiment(write_yaml(text))
    assert "zero" in str(info.value)


def test_unsafe_yaml_tags_are_rejected(write_yaml):
    path = write_yaml(BASE.replace("name: exp", "name: !!python/object/apply:os.system ['true']"))
    assert "not valid YAML" in error_of(path)


def test_prompt_without_template_says_which_keys(write_yaml):
    message = error_of(write_yaml(BASE.replace('      template: "Q: {{ question }} A: {{ answer }}"\n', "", 1)))
    assert "`runs.zero.prompt`" in message and "`template` (one) or `templates`" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("      extract: 'answer is yes'\n", "needs a capture group"),
        ("      extract: 'answer is (yes'\n", "not a valid regular expression"),
        ("      samples: 8\n", "`temperature: 0`"),
        ("      combine: vote\n", "`combine` applies to `templates`"),
    ],
)
def test_prompt_option_conflicts(write_yaml, extra, expected):
    text = BASE.replace(
        '      template: "Q: {{ question }} A: {{ answer }}"\n',
        '      template: "Q: {{ question }} A: {{ answer }}"\n' + extra,
        1,
    )
    assert expected in error_of(write_yaml(text))
