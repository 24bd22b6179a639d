"""`taskfit compare`: paired comparisons between cells on the same items."""

from __future__ import annotations

import json
import os
import re

import pytest
from typer.testing import CliRunner

import taskfit
from taskfit.cli import app
from taskfit.compare import compare_cells
from taskfit.errors import TaskfitError
from taskfit.evaluation.statistics import mcnemar_exact
from taskfit.rundir import load_cells

RUNS = """
runs:
  plain:
    prompt: {template: "Review: {{ text }}\\nSentiment: {{ answer }}"}
  cloze:
    prompt: {template: "{{ text }} It was {{ answer }}.", answers: {positive: great, negative: awful}}
  shots:
    prompt: {template: "Review: {{ text }}\\nSentiment: {{ answer }}", shots: 3, demos: balanced}
"""


@pytest.fixture
def experiment(project, fake_lm):
    text = (project / "cls.yaml").read_text()
    (project / "three.yaml").write_text(text[: text.index("runs:")] + RUNS)
    taskfit.run(project / "three.yaml", out=project / "out", lm=fake_lm())
    return project / "out"


def test_all_pairs_with_holm_adjustment(experiment):
    result = compare_cells(load_cells([experiment]))
    rows = result["comparisons"]
    assert {(r["a"], r["b"]) for r in rows if r["metric"] == "accuracy"} == {
        ("plain", "cloze"),
        ("plain", "shots"),
        ("cloze", "shots"),
    }
    assert {r["metric"] for r in rows} == {"accuracy", "macro_f1"}
    for r in rows:
        assert r["p_adjusted"] >= r["p_value"]
        assert r["ci95"][0] <= r["difference"] <= r["ci95"][1] or r["difference"] == 0
        assert r["difference"] == pytest.approx(r["a_value"] - r["b_value"])
        assert r["mdd"] > 0 if r["metric"] == "accuracy" else r["mdd"] is None  # McNemar's: accuracy alone


def test_accuracy_uses_exact_mcnemar_on_the_items(experiment):
    cells = {c.label: c for c in load_cells([experiment])}
    row = next(
        r
        for r in compare_cells(list(cells.values()))["comparisons"]
        if r["metric"] == "accuracy" and (r["a"], r["b"]) == ("plain", "cloze")
    )
    by_id = lambda cell: {p["id"]: p["correct"] for p in cell.predictions}  # noqa: E731
    a, b = by_id(cells["plain"]), by_id(cells["cloze"])
    ids = sorted(a)
    assert row["test"] == "mcnemar_exact"
    assert row["p_value"] == mcnemar_exact([a[i] for i in ids], [b[i] for i in ids])["p_value"]


def test_different_test_items_are_refused(project, fake_lm, experiment):
    taskfit.run(project / "three.yaml", out=project / "fewer", lm=fake_lm(), limit=5, only=["plain"])
    with pytest.raises(TaskfitError, match="same test items"):
        compare_cells(load_cells([experiment / "cloze", project / "fewer" / "plain"]))


def test_cli_writes_comparison_json_and_exits_2_on_mismatch(project, fake_lm, experiment):
    runner = CliRunner()
    ok = runner.invoke(app, ["compare", str(experiment)])
    assert ok.exit_code == 0, ok.output
    saved = json.loads((experiment / "comparison.json").read_text())
    assert len(saved["comparisons"]) == 6
    taskfit.run(project / "three.yaml", out=project / "fewer", lm=fake_lm(), limit=5, only=["plain"])
    bad = runner.invoke(app, ["compare", str(experiment / "cloze"), str(project / "fewer" / "plain")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_seeds_pair_only_cells_of_the_same_seed(project, fake_lm):
    text = (project / "cls.yaml").read_text()
    (project / "seeds.yaml").write_text(text[: text.index("runs:")] + "seeds: [0, 1]\n" + RUNS)
    taskfit.run(project / "seeds.yaml", out=project / "s", lm=fake_lm(), only=["plain", "shots"])
    rows = [r for r in compare_cells(load_cells([project / "s"]))["comparisons"] if r["metric"] == "accuracy"]
    assert sorted((r["a"], r["b"]) for r in rows) == [("plain#seed0", "shots#seed0"), ("plain#seed1", "shots#seed1")]


def _cell(tmp_path, name, kind, rows):
    from taskfit.rundir import CellResult

    manifest = {"run": name, "label": name, "seed": 0, "task": {"type": kind, "labels": []}, "metrics": {}}
    return CellResult(tmp_path / name, manifest, rows)


def test_generation_runs_compare_per_example_scores(tmp_path):
    refs = ["paris", "blue", "seven", "a cat"]
    good = [{"id": str(i), "label": r, "references": [r], "prediction": r, "correct": True} for i, r in enumerate(refs)]
    bad = [{**row, "prediction": "no idea", "correct": False} for row in good]
    rows = compare_cells([_cell(tmp_path, "good", "generation", good), _cell(tmp_path, "bad", "generation", bad)])
    by_metric = {r["metric"]: r for r in rows["comparisons"]}
    assert set(by_metric) == {"exact_match", "token_f1", "rouge_l", "bleu", "chrf"}
    em = by_metric["exact_match"]
    assert em["mdd"] > 0 and by_metric["token_f1"]["mdd"] is None and by_metric["rouge_l"]["mdd"] is None
    assert (em["a_value"], em["b_value"], em["difference"]) == (1.0, 0.0, 1.0)
    assert em["ci95"] == [1.0, 1.0] and 0 < em["p_value"] <= 1
    chrf = by_metric["chrf"]  # corpus-level: the paired tests resample and swap n-gram counts
    assert chrf["a_value"] == 1.0 and chrf["b_value"] < 0.2 and chrf["difference"] == chrf["a_value"] - chrf["b_value"]
    assert chrf["ci95"][0] > 0 and chrf["test"] == "paired_permutation" and chrf["mdd"] is None


def test_a_corpus_metric_of_two_equal_runs_differs_by_nothing(tmp_path):
    refs = ["paris", "the blue sky", "seven", "a cat sat"]
    rows = [
        {"id": str(i), "label": r, "references": [r], "prediction": r[:-1], "correct": False}
        for i, r in enumerate(refs)
    ]
    rows = compare_cells([_cell(tmp_path, "a", "generation", rows), _cell(tmp_path, "b", "generation", rows)])
    for row in (r for r in rows["comparisons"] if r["metric"] in ("bleu", "chrf")):
        assert row["difference"] == 0.0 and row["ci95"] == [0.0, 0.0] and row["p_value"] == 1.0


def test_token_classification_runs_compare_entity_metrics(tmp_path):
    gold = [["B-PER", "O"], ["B-LOC", "I-LOC"], ["O", "B-ORG"]]
    a = [{"id": str(i), "label": g, "prediction": g, "correct": True} for i, g in enumerate(gold)]
    b = [{**row, "prediction": ["O"] * len(row["label"]), "correct": False} for row in a]
    rows = compare_cells(
        [_cell(tmp_path, "a", "token_classification", a), _cell(tmp_path, "b", "token_classification", b)]
    )
    f1 = next(r for r in rows["comparisons"] if r["metric"] == "entity_f1")
    assert f1["a_value"] == 1.0 and f1["b_value"] == 0.0 and f1["difference"] == 1.0


def test_permutations_grow_with_the_pairs_so_holm_can_reach_small_p(tmp_path):
    """With 6 runs (15 pairs) and 1,000 permutations, Holm's smallest adjusted p could not go
    below 15/1001 = 0.015; the permutations now grow with the pairs."""
    import random

    from taskfit.compare import PERMUTATIONS_PER_PAIR
    from taskfit.rundir import CellResult

    labels = ["a", "b", "c"]
    rng = random.Random(0)
    gold = [labels[i % 3] for i in range(300)]
    cells = []
    for k in range(6):
        predictions = gold if k == 0 else [rng.choice(labels) for _ in gold]
        rows = [{"id": str(i), "label": g, "prediction": p, "correct": g == p} for i, (g, p) in
                enumerate(zip(gold, predictions))]  # fmt: skip
        manifest = {"run": f"r{k}", "label": f"r{k}", "seed": 0, "task": {"type": "classification", "labels": labels},
                    "metrics": {"accuracy": 0.0, "macro_f1": 0.0}}  # fmt: skip
        cells.append(CellResult(tmp_path / f"r{k}", manifest, rows))
    rows = [r for r in compare_cells(cells)["comparisons"] if r["metric"] == "macro_f1"]
    assert len(rows) == 15 and {r["permutations"] for r in rows} == {15 * PERMUTATIONS_PER_PAIR}
    perfect_vs_random = [r for r in rows if "r0" in (r["a"], r["b"])]
    assert max(r["p_adjusted"] for r in perfect_vs_random) < 15 / 1001 / 5


def test_report_shows_a_stored_comparison_only_while_its_runs_are_unchanged(project, fake_lm, experiment):
    """comparison.json records a hash of each cell's predictions; once a run is written again
    (here on fewer items), the report computes the comparison afresh instead of showing the old."""
    from taskfit.report.data import gather

    assert CliRunner().invoke(app, ["compare", str(experiment)]).exit_code == 0
    stored = json.loads((experiment / "comparison.json").read_text())
    assert gather(experiment).comparisons == stored["comparisons"]
    taskfit.run(project / "three.yaml", out=experiment, lm=fake_lm(), limit=5)
    rows = gather(experiment).comparisons
    assert rows and all(r["n"] == 5 for r in rows)
    assert {r["n"] for r in stored["comparisons"]} != {5}


def test_runs_whose_gold_answers_differ_are_refused_for_every_task_type(tmp_path):
    refs = ["paris", "blue", "seven"]
    a = [{"id": str(i), "label": r, "references": [r], "prediction": r, "correct": True} for i, r in enumerate(refs)]
    b = [{**row, "label": "rome", "references": ["rome"]} if row["id"] == "1" else row for row in a]
    with pytest.raises(TaskfitError, match=r"disagree on the gold answer of 1 test item\(s\) \(first: '1'\)"):
        compare_cells([_cell(tmp_path, "a", "generation", a), _cell(tmp_path, "b", "generation", b)])
    tags = [{"id": "0", "label": ["B-PER", "O"], "prediction": ["O", "O"], "correct": False}]
    other = [{**tags[0], "label": ["O", "O"]}]
    with pytest.raises(TaskfitError, match="disagree on the gold answer"):
        compare_cells(
            [_cell(tmp_path, "a", "token_classification", tags), _cell(tmp_path, "b", "token_classification", other)]
        )


def test_runs_of_tasks_with_other_labels_are_refused(experiment, project, fake_lm):
    cells = load_cells([experiment / "plain", experiment / "cloze"])
    cells[1].manifest["task"]["labels"] = ["bad", "good"]
    with pytest.raises(TaskfitError, match="different labels"):
        compare_cells(cells)


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    [
        (
            "predictions.jsonl",
            '{"id": "a", "prediction": "x"}\n{"id": "b", "predic',
            r"predictions.jsonl, line 2: not valid JSON",
        ),
        ("predictions.jsonl", "[1, 2]\n", r"line 1: not a prediction row"),
        (
            "predictions.jsonl",
            '{"id": "a", "prediction": 1}\n{"id": "a", "prediction": 2}\n',
            r"line 2: item 'a' appears twice",
        ),
        ("manifest.json", '{"run": "pla', r"manifest.json: not valid JSON"),
        ("manifest.json", "[]", r"manifest.json: not a taskfit manifest"),
    ],
)
def test_damaged_run_files_are_named_with_their_line(experiment, file, content, expected):
    (experiment / "plain" / file).write_text(content)
    result = CliRunner().invoke(app, ["compare", str(experiment)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert re.search(expected, result.stderr) and "run `taskfit run` again" in result.stderr


def test_a_prediction_outside_the_label_set_is_named(experiment):
    path = experiment / "cloze" / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[3]["prediction"] = "Positive"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskfitError, match=rf"item '{rows[3]['id']}': prediction 'Positive' is not one of the labels"):
        compare_cells(load_cells([experiment]))


def test_a_folder_given_twice_counts_once_and_seeds_of_one_run_are_not_compared(project, fake_lm, experiment):
    assert len(load_cells([experiment, experiment / "plain", experiment])) == 3
    text = (project / "cls.yaml").read_text()
    (project / "seeds.yaml").write_text(text[: text.index("runs:")] + "seeds: [0, 1]\n" + RUNS)
    taskfit.run(project / "seeds.yaml", out=project / "s", lm=fake_lm(), only=["plain"])
    result = CliRunner().invoke(app, ["compare", str(project / "s")])
    assert result.exit_code == 2 and "nothing to compare" in result.stderr and "plain#seed1" in result.stderr


def test_compare_never_replaces_a_file_that_is_not_a_comparison(experiment, tmp_path):
    runner = CliRunner()
    predictions = experiment / "plain" / "predictions.jsonl"
    before = predictions.read_text()
    result = runner.invoke(app, ["compare", str(experiment), "--out", str(predictions)])
    assert result.exit_code == 2 and "not a comparison written by taskfit" in result.stderr
    assert predictions.read_text() == before
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}')
    assert runner.invoke(app, ["compare", str(experiment), "--out", str(mine)]).exit_code == 2
    assert mine.read_text() == '{"my": "notes"}'
    assert runner.invoke(app, ["compare", str(experiment), "--out", str(tmp_path)]).exit_code == 2
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "target.json")
    again = runner.invoke(app, ["compare", str(experiment), "--out", str(link)])
    assert again.exit_code == 0 and link.is_symlink() and "comparisons" in (tmp_path / "target.json").read_text()
    assert runner.invoke(app, ["compare", str(experiment), "--out", str(link)]).exit_code == 0  # ours: replaced


def test_compare_prints_its_table_and_names_a_folder_it_cannot_write(experiment, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = CliRunner().invoke(app, ["compare", str(experiment), "--out", str(locked / "c.json")])
    finally:
        locked.chmod(0o700)
    if os.geteuid() == 0:  # root writes anyway: nothing to refuse
        assert result.exit_code == 0
    else:
        assert result.exit_code == 2 and "cannot write it" in result.stderr
    assert "plain vs cloze" in result.stdout


def test_compare_refuses_a_negative_seed(experiment):
    result = CliRunner().invoke(app, ["compare", str(experiment), "--seed", "-1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
