"""Task types: label spaces, gold answers, ids, and the errors for bad rows."""

from __future__ import annotations

import json

import pytest

from taskfit import TaskfitError, load_task


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def mc_yaml(test="t.jsonl", extra=""):
    return (
        "name: t\n"
        "task:\n"
        "  type: multiple_choice\n"
        f"  data: {{test: {test}}}\n"
        "  choices: choices\n"
        f"  label: answer{extra}\n"
        "runs:\n"
        '  zero: {prompt: {template: "{{ question }} {{ answer }}"}}\n'
    )


def cls_yaml(train="cls_train.csv", test="cls_small.csv", extra=""):
    data = f"{{train: {train}, test: {test}}}" if train else f"{{test: {test}}}"
    return (
        "name: t\n"
        "task:\n"
        "  type: classification\n"
        f"  data: {data}{extra}\n"
        "runs:\n"
        '  zero: {prompt: {template: "{{ text }} {{ answer }}"}}\n'
    )


def task_error(path) -> str:
    with pytest.raises(TaskfitError) as info:
        load_task(path)
    return str(info.value)


def test_multiple_choice_task(project):
    task = load_task(project / "mc.yaml")
    assert task.type == "multiple_choice"
    assert task.metrics == ("accuracy",)
    assert task.labels is None
    test = task.split("test")
    assert [ex.id for ex in test] == [f"m{i}" for i in range(1, 9)]
    assert test[0].options == ("sad", "excited", "proud")
    assert [ex.gold for ex in test] == [0, 0, 1, 0, 1, 1, 2, 2]
    assert test[2].gold_text == "buy flour"
    assert test[0].source == "mc_small.jsonl:1"
    assert len(task.split("train")) == 6
    assert task.split("dev") == []


def test_classification_task(project):
    task = load_task(project / "cls.yaml")
    assert task.metrics == ("accuracy", "macro_f1")
    assert task.labels == ("negative", "neutral", "positive")
    test = task.split("test")
    assert [ex.gold_text for ex in test] == [
        "positive",
        "negative",
        "neutral",
        "positive",
        "negative",
        "neutral",
        "positive",
        "negative",
    ]
    assert all(ex.options == task.labels for ex in test)
    assert test[0].id == "c1"
    assert test[0].fields["text"].startswith("The soup was delicious")


def test_labels_come_from_train_split_sorted(project, write_yaml):
    rows = ["id,text,label", "1,a,zebra", "2,b,apple", "3,c,mango", "4,d,apple"]
    (project / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (project / "test.csv").write_text("id,text,label\n1,x,mango\n", encoding="utf-8")
    task = load_task(write_yaml(cls_yaml(train="train.csv", test="test.csv")))
    assert task.labels == ("apple", "mango", "zebra")
    assert task.split("test")[0].gold == 1


def test_labels_come_from_train_not_test(project, write_yaml):
    """A label present only in the test split is not silently added to the label space."""
    (project / "train.csv").write_text("id,text,label\n1,a,yes\n2,b,no\n", encoding="utf-8")
    (project / "test.csv").write_text("id,text,label\n1,x,yes\n2,y,maybe\n", encoding="utf-8")
    message = task_error(write_yaml(cls_yaml(train="train.csv", test="test.csv")))
    assert "'maybe'" in message
    assert "test.csv:3" in message


def test_labels_listed_in_config_keep_their_order(write_yaml):
    task = load_task(write_yaml(cls_yaml(extra="\n  labels: [positive, negative, neutral]")))
    assert task.labels == ("positive", "negative", "neutral")
    assert task.split("test")[0].gold == 0  # c1 is positive


def test_gold_label_not_in_labels(write_yaml):
    message = task_error(write_yaml(cls_yaml(extra="\n  labels: [negative, positive]")))
    assert "gold label 'neutral'" in message
    assert "cls_train.csv:4" in message  # r3 is the first neutral row (line 4 of the train file)
    assert "negative, positive" in message


def test_single_label_classification_is_an_error(project, write_yaml):
    (project / "train.csv").write_text("id,text,label\n1,a,yes\n2,b,yes\n", encoding="utf-8")
    message = task_error(write_yaml(cls_yaml(train="train.csv")))
    assert "at least two" in message


def test_json_labels_compare_as_text(project, write_yaml):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": True}]
    write_jsonl(project / "t.jsonl", rows)
    task = load_task(write_yaml(cls_yaml(train=None, test="t.jsonl", extra="\n  labels: ['0', '1', 'true']")))
    assert [ex.gold for ex in task.split("test")] == [1, 0, 2]


def test_mc_gold_index_out_of_range(project, write_yaml, mc_train):
    rows = mc_train[:2] + [{**mc_train[2], "answer": 3}]
    write_jsonl(project / "t.jsonl", rows)
    message = task_error(write_yaml(mc_yaml()))
    assert "t.jsonl:3" in message
    assert "out of range" in message
    assert "0 to 2" in message


def test_mc_negative_gold_index(project, write_yaml, mc_train):
    write_jsonl(project / "t.jsonl", [{**mc_train[0], "answer": -1}])
    assert "out of range" in task_error(write_yaml(mc_yaml()))


def test_mc_gold_given_as_option_text(project, write_yaml, mc_train):
    rows = [{**mc_train[0], "answer": "paint it"}, {**mc_train[1], "answer": "tired"}]
    write_jsonl(project / "t.jsonl", rows)
    task = load_task(write_yaml(mc_yaml()))
    assert [ex.gold for ex in task.split("test")] == [2, 1]


def test_mc_gold_as_digit_string_from_csv(project, write_yaml):
    (project / "t.csv").write_text('id,question,choices,answer\nq1,Q?,"[""x"", ""y"", ""z""]",2\n', encoding="utf-8")
    task = load_task(write_yaml(mc_yaml(test="t.csv")))
    [ex] = task.split("test")
    assert ex.options == ("x", "y", "z")
    assert ex.gold == 2


def test_mc_gold_neither_index_nor_option(project, write_yaml, mc_train):
    write_jsonl(project / "t.jsonl", [{**mc_train[0], "answer": "sing"}])
    message = task_error(write_yaml(mc_yaml()))
    assert "'sing'" in message
    assert "neither an index" in message


def test_mc_choices_as_list_of_fields(project, write_yaml):
    write_jsonl(project / "t.jsonl", [{"id": "x", "question": "Q?", "a": "one", "b": "two", "answer": "two"}])
    text = mc_yaml().replace("choices: choices", "choices: [a, b]")
    [ex] = load_task(write_yaml(text)).split("test")
    assert ex.options == ("one", "two")
    assert ex.gold == 1


def test_mc_choices_not_a_list(project, write_yaml):
    write_jsonl(project / "t.jsonl", [{"id": "x", "question": "Q?", "choices": "just one", "answer": 0}])
    message = task_error(write_yaml(mc_yaml()))
    assert "t.jsonl:1" in message
    assert "at least two options" in message


def test_duplicate_ids_name_both_locations(project, write_yaml, mc_train):
    rows = [mc_train[0], mc_train[1], {**mc_train[2], "id": mc_train[0]["id"]}]
    write_jsonl(project / "t.jsonl", rows)
    message = task_error(write_yaml(mc_yaml()))
    assert "duplicate id 't1'" in message
    assert "t.jsonl:1" in message
    assert "t.jsonl:3" in message


def test_same_id_in_different_splits_is_fine(project, write_yaml, mc_train):
    write_jsonl(project / "t.jsonl", mc_train[:2])
    text = mc_yaml().replace("data: {test: t.jsonl}", "data: {train: t.jsonl, test: t.jsonl}")
    task = load_task(write_yaml(text))
    assert [ex.id for ex in task.split("train")] == [ex.id for ex in task.split("test")] == ["t1", "t2"]


def test_missing_label_field_mc_did_you_mean(write_yaml):
    message = task_error(write_yaml(mc_yaml(test="mc_small.jsonl").replace("label: answer", "label: answr")))
    assert "mc_small.jsonl:1" in message
    assert "no field 'answr'" in message
    assert "Did you mean 'answer'?" in message
    assert "task.label" in message


def test_missing_choices_field_did_you_mean(write_yaml):
    message = task_error(write_yaml(mc_yaml(test="mc_small.jsonl").replace("choices: choices", "choices: choises")))
    assert "no field 'choises'" in message
    assert "Did you mean 'choices'?" in message
    assert "mc_small.jsonl:1" in message


def test_missing_label_field_classification_did_you_mean(write_yaml):
    """A misspelt `task.label` must be reported as a missing field with a suggestion, as for
    multiple choice, not as "0 distinct labels"."""
    message = task_error(write_yaml(cls_yaml(extra="\n  label: lable")))
    assert "no field 'lable'" in message
    assert "Did you mean 'label'?" in message


def test_ids_default_to_split_and_line(project, write_yaml, mc_train):
    rows = [{k: v for k, v in r.items() if k != "id"} for r in mc_train[:3]]
    lines = [json.dumps(rows[0]), "", json.dumps(rows[1]), json.dumps(rows[2])]
    (project / "t.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = load_task(write_yaml(mc_yaml()))
    assert [ex.id for ex in task.split("test")] == ["test-1", "test-3", "test-4"]


def test_ids_default_in_csv_and_train_split(project, write_yaml):
    (project / "train.csv").write_text("text,label\na,yes\nb,no\n", encoding="utf-8")
    (project / "test.csv").write_text("text,label\nc,no\n", encoding="utf-8")
    task = load_task(write_yaml(cls_yaml(train="train.csv", test="test.csv")))
    assert [ex.id for ex in task.split("train")] == ["train-2", "train-3"]
    assert [ex.id for ex in task.split("test")] == ["test-2"]


def test_custom_id_field(project, write_yaml):
    (project / "t.csv").write_text("key,text,label\nk9,a,yes\nk7,b,no\n", encoding="utf-8")
    task = load_task(write_yaml(cls_yaml(train=None, test="t.csv", extra="\n  id: key")))
    assert [ex.id for ex in task.split("test")] == ["k9", "k7"]


def test_missing_data_file_names_it(write_yaml):
    message = task_error(write_yaml(cls_yaml(train="nope.csv")))
    assert "nope.csv" in message
    assert "not found" in message


def test_jsonl_test_split_is_lazy_and_equal_to_the_csv_one(project, tmp_path):
    """A JSONL test split is rebuilt from disk on each pass; its examples equal those of the
    same rows read from CSV (held in memory), except for where each row came from."""
    import csv

    from taskfit.data import LazyExamples

    rows = [{"id": f"r{i}", "text": f"text {i}", "label": ["yes", "no"][i % 2]} for i in range(5)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    for name in ("jsonl", "csv"):
        (tmp_path / f"{name}.yaml").write_text(cls_yaml(train=None, test=f"t.{name}"), encoding="utf-8")
    lazy, eager = load_task(tmp_path / "jsonl.yaml").split("test"), load_task(tmp_path / "csv.yaml").split("test")
    assert isinstance(lazy, LazyExamples) and isinstance(eager, list)
    strip = lambda examples: [(e.id, e.fields, e.options, e.gold) for e in examples]  # noqa: E731
    assert strip(lazy) == strip(lazy) == strip(eager)
    assert strip(lazy[1:3]) == strip(eager[1:3]) and strip([lazy[-1]]) == strip([eager[-1]])
    assert lazy[0].source == "t.jsonl:1"


def test_duplicate_ids_in_a_lazy_split_name_both_lines(tmp_path):
    rows = [{"id": "x", "text": "a", "label": "yes"}, {"id": "y", "text": "b", "label": "no"}]
    write_jsonl(tmp_path / "t.jsonl", [*rows, {"id": "x", "text": "c", "label": "no"}])
    (tmp_path / "e.yaml").write_text(cls_yaml(train=None, test="t.jsonl"), encoding="utf-8")
    message = task_error(tmp_path / "e.yaml")
    assert "duplicate id 'x' at t.jsonl:1 and t.jsonl:3" in message


@pytest.mark.parametrize(("option", "shown"), [(None, "null"), (["p"], "a list"), ({"t": "p"}, "a dict")])
def test_mc_option_that_is_not_text(project, write_yaml, option, shown):
    write_jsonl(project / "t.jsonl", [{"id": "x", "question": "Q?", "choices": ["p", option], "answer": 0}])
    message = task_error(write_yaml(mc_yaml()))
    assert "t.jsonl:1" in message
    assert f"option 1 in 'choices' is {shown}" in message


def test_mc_option_field_that_is_null(project, write_yaml):
    write_jsonl(project / "t.jsonl", [{"id": "x", "question": "Q?", "a": "one", "b": None, "answer": 0}])
    message = task_error(write_yaml(mc_yaml().replace("choices: choices", "choices: [a, b]")))
    assert "t.jsonl:1" in message and "option 1 in 'b' is null" in message


@pytest.mark.parametrize(("choices", "twice"), [(["p", "p"], "p"), (["1", 1, "q"], "1")])
def test_mc_duplicate_options_are_an_error(project, write_yaml, choices, twice):
    rows = [{"id": "x", "question": "Q?", "choices": ["a", "b"], "answer": 0}]
    rows.append({"id": "y", "question": "Q?", "choices": choices, "answer": 0})
    write_jsonl(project / "t.jsonl", rows)
    message = task_error(write_yaml(mc_yaml()))
    assert "t.jsonl:2" in message
    assert f"option '{twice}' appears twice" in message
