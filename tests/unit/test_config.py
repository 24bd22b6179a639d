"""The experiment file schema: strict keys with line numbers and did-you-mean, clear type errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from taskfit import TaskfitError, load_experiment
from taskfit.config import DEFAULT_MODEL, dump_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


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


def with_prompt_option(extra: str) -> str:
    return BASE.replace("      shots: 0\n", "      shots: 0\n" + extra, 1)


@pytest.mark.parametrize("seed", ["seed: -1", "seeds: [0, -1]"])
def test_negative_seed_is_an_error(write_yaml, seed):
    message = error_of(write_yaml(BASE.replace("name: exp", f"name: exp\n{seed}")))
    assert "line 2" in message
    assert "0 or more" in message


@pytest.mark.parametrize("name", [".", "..", "x" * 101])
def test_experiment_name_that_is_no_folder_of_its_own(write_yaml, name):
    message = error_of(write_yaml(BASE.replace("name: exp", f"name: '{name}'")))
    assert "`name`" in message and "line 1" in message
    assert "up to 100 letters" in message


@pytest.mark.parametrize("name", ["x" * 100, "a.b-c_D9", ".hidden"])
def test_experiment_names_still_allowed(write_yaml, name):
    assert load_experiment(write_yaml(BASE.replace("name: exp", f"name: '{name}'"))).config.name == name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x" * 101, "up to 100 letters"),
        ("results.json", "is taken"),
        ("config.yaml", "is taken"),
        ("report_files", "is taken"),
        ("cache", "is taken"),
        ("Report.HTML", "is taken"),  # the same file on a case-insensitive file system
    ],
)
def test_run_name_that_cannot_be_its_folder(write_yaml, name, expected):
    message = error_of(write_yaml(BASE.replace("  zero:", f"  '{name}':")))
    assert f"run name '{name}'" in message and expected in message
    assert "line 10" in message


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
def test_unknown_device_lists_the_valid_ones(write_yaml, device):
    message = error_of(write_yaml(BASE.replace("  name: smollm2", f"  device: '{device}'\n  name: smollm2")))
    assert "`model.device`" in message and "line 9" in message
    assert "auto, cpu, cuda, cuda:N" in message and "mps" in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_known_devices_load(write_yaml, device):
    cfg = load_experiment(write_yaml(BASE.replace("  name: smollm2", f"  device: '{device}'\n  name: smollm2"))).config
    assert cfg.model.device == device


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("      calibrate: contextual\n      content_free: []\n", "needs at least one `content_free`"),
        ("      stop: ['\\n', '']\n", "`stop` lists an empty string"),
    ],
)
def test_settings_the_run_cannot_honour(write_yaml, extra, expected):
    message = error_of(write_yaml(with_prompt_option(extra)))
    assert expected in message and "line 12" in message  # the run's `prompt:` key


@pytest.mark.parametrize(
    ("text", "field", "quoted"),
    [
        ("  label: answer", "`task.labels.0`", '"yes"'),
        ("      answers: {positive: yes}", "`runs.zero.prompt.answers.positive`", '"yes"'),
        ("      answers: {no: nope}", "`runs.zero.prompt.answers`: the key false", '"yes"'),
        ("      answers: {positive: [good, 1]}", "`runs.zero.prompt.answers.positive.1`", '"1"'),
    ],
)
def test_unquoted_yaml_booleans_and_numbers_say_to_quote(write_yaml, text, field, quoted):
    cls = BASE.replace("type: multiple_choice", "type: classification").replace("  choices: choices\n", "")
    if text.startswith("  label"):
        cls = cls.replace("  label: answer", "  label: answer\n  labels: [yes, no]")
    else:
        cls = cls.replace("      shots: 0\n", f"      shots: 0\n{text}\n")
    message = error_of(write_yaml(cls))
    assert field in message
    assert "quote it" in message and quoted in message
    assert "Input should be" not in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("shots: 0", 'shots: "two"', "`runs.zero.prompt.shots`: expected a whole number or a list, got 'two'."),
        ("runs:\n  zero:", "runs: {}\n  zero:", "`runs`: needs at least 1 entry; it has 0."),
    ],
)
def test_pydantic_wording_becomes_one_plain_sentence(write_yaml, old, new, expected):
    text = BASE.replace(old, new, 1)
    if new.startswith("runs: {}"):
        text = text.split("runs:")[0] + "runs: {}\n"
    message = error_of(write_yaml(text))
    assert message.splitlines() == [m for m in message.splitlines() if expected in m], message
    assert len(message.splitlines()) == 1


def test_choice_typo_suggests_the_valid_one(write_yaml):
    message = error_of(write_yaml(BASE.replace("shots: 0", "shots: 1\n      demos: balance")))
    assert "Did you mean 'balanced'?" in message


def round_trip(path: Path, tmp_path: Path):
    config = load_experiment(path).config
    copy = tmp_path / "resolved.yaml"
    copy.write_text(dump_config(config), encoding="utf-8")
    return config, load_experiment(copy).config


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_dumped_example_config_loads_back_equal(path, tmp_path):
    config, again = round_trip(path, tmp_path)
    assert again == config


def test_examples_are_found():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize(
    "runs",
    [
        # one template: the default `combine` must not come back as an error
        '  one:\n    prompt:\n      template: "{{ question }} {{ answer }}"\n',
        # several templates with a combine; answers; shots as a list; stop strings and separators
        "  many:\n    prompt:\n      templates: ['{{ question }}: {{ answer }}', 'Q {{ question }}\\n{{ answer }}']\n"
        "      combine: vote\n      shots: [0, 2]\n      separator: '\\t#: '\n      stop: ['\\n', 'yes', 'null']\n",
        # text that YAML would read as booleans, numbers or null unless quoted
        '  words:\n    prompt:\n      template: "{{ answer }}"\n'
        "      content_free: ['yes', '1', '~', 'null', '', 'é 日本']\n",
        # fine-tuning with `all` among the train sizes, a run's own model given by name, infinite margin
        "  tune:\n    model: other-model\n    finetune: {method: full, train_sizes: [8, all], learning_rate: 1.0e-5}\n",
        "  inf:\n    model: {name: m, recheck_margin: .inf}\n    prompt: {template: '{{ answer }}'}\n",
    ],
)
def test_dumped_edge_case_configs_load_back_equal(write_yaml, tmp_path, runs):
    text = BASE.split("runs:")[0].replace("name: exp", "name: exp\nseeds: [0, 3]") + "runs:\n" + runs
    config, again = round_trip(write_yaml(text), tmp_path)
    assert again == config


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("      shots: 0\n", "      shots: true\n", "not true/false"),
        ("      shots: 0\n", "      shots: 0\n      demo_sets: 3\n", "the sets would be identical and empty"),
        ("      shots: 0\n", "      shots: 2\n      demo_sets: 3\n", "`demos: first` with `order: fixed` draws"),
    ],
)
def test_settings_that_would_mislead_are_refused(write_yaml, old, new, expected):
    assert expected in error_of(write_yaml(BASE.replace(old, new, 1)))


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ("  t:\n    finetune: {train_sizes: [all, all]}\n", "lists a size twice"),
        ("  t:\n    finetune: {train_sizes: [0]}\n", "1 or more"),
        ("  t:\n    finetune: {target_modules: []}\n", "target_modules"),
    ],
)
def test_finetuning_lists_that_would_mislead_are_refused(write_yaml, runs, expected):
    base = BASE[: BASE.index("runs:")]
    assert expected in error_of(write_yaml(base + "runs:\n" + runs))


def test_a_model_listed_twice_is_refused(write_yaml):
    text = BASE.replace(
        "model:\n  name: smollm2-135m-instruct\n", "models: [smollm2-135m-instruct, smollm2-135m-instruct]\n"
    )
    assert "lists one model twice" in error_of(write_yaml(text))


def test_settings_no_run_reads_are_named_and_defaults_are_not(write_yaml):
    """Only what the file sets counts: a scoring run with sampling settings, reasoning settings
    without chain of thought, demonstration settings without shots, LoRA settings on full
    fine-tuning, a tracking URI without tracking."""
    from taskfit.ignored import ignored_settings

    base = BASE[: BASE.index("runs:")]
    text = base + (
        "tracking_uri: file:/tmp/x\nruns:\n"
        "  zero:\n    prompt:\n"
        '      template: "Q: {{ question }} A: {{ answer }}"\n'
        "      temperature: 0.7\n      max_new_tokens: 20\n      trigger: Think.\n      order: random\n"
        "  cot:\n    prompt:\n"
        '      template: "Q: {{ question }} A: {{ answer }}"\n'
        "      chain_of_thought: true\n      temperature: 0.7\n      samples: 3\n      shots: 2\n      order: random\n"
        "  full:\n    finetune: {method: full, r: 4}\n"
    )
    notes = ignored_settings(load_experiment(write_yaml(text)).config, "multiple_choice")
    assert notes == [
        "tracking_uri: not used without `tracking: mlflow`",
        "runs.zero.prompt.temperature: not used: this run scores the answer options (a run generates text with "
        "chain_of_thought, samples > 1 or extract)",
        "runs.zero.prompt.max_new_tokens: not used: this run scores the answer options (a run generates text with "
        "chain_of_thought, samples > 1 or extract)",
        "runs.zero.prompt.trigger: not used without `chain_of_thought: true`",
        "runs.zero.prompt.order: not used with `shots: 0`",
        "runs.full.finetune.r: not used with `method: full` (a LoRA setting)",
    ]
    assert ignored_settings(load_experiment(write_yaml(BASE)).config, "multiple_choice") == []


def test_finetuning_settings_a_head_never_reads_are_named(write_yaml):
    from taskfit.ignored import ignored_settings

    base = BASE[: BASE.index("task:")]
    text = base + (
        "task:\n  type: classification\n  data: {train: cls_train.csv, dev: cls_train.csv, test: cls_small.csv}\n"
        "  dev_fraction: 0.3\nruns:\n  t:\n    finetune: {chat: true, packing: true}\n"
    )
    notes = ignored_settings(load_experiment(write_yaml(text)).config, "classification")
    assert notes == [
        "runs.t.finetune.chat: not used: classification fine-tuning trains a head on the input text",
        "runs.t.finetune.packing: not used: classification fine-tuning trains a head on the input text",
        "task.dev_fraction: not used: the dev split comes from `task.data.dev`",
    ]


def test_settings_a_generation_task_never_reads_are_named(write_yaml):
    from taskfit.ignored import ignored_settings

    base = BASE[: BASE.index("task:")]
    text = base + (
        "task: {type: generation, data: {test: gen.jsonl}, label: target}\nruns:\n  g:\n    prompt:\n"
        '      template: "Q: {{ q }} A: {{ answer }}"\n      answer_pooling: mean\n      vote: mean_prob\n'
        "      top_p: 0.9\n"
    )
    (write_yaml(text).parent / "gen.jsonl").write_text('{"id": "a", "q": "x", "target": "y"}\n')
    notes = ignored_settings(load_experiment(write_yaml(text)).config, "generation")
    assert notes == [
        "runs.g.prompt.answer_pooling: not used on a generation task (it applies to scored answer options)",
        "runs.g.prompt.vote: mean_prob averages option probabilities; a generation task votes by majority",
        "runs.g.prompt.top_p: not used: greedy decoding (temperature 0)",
    ]
