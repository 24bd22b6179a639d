"""`taskfit.report.write_report` on experiment folders written by `taskfit.run` with the fake LM."""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import taskfit
from taskfit.cli import app
from taskfit.compare import fingerprints
from taskfit.errors import TaskfitError
from taskfit.report import output, write_report
from taskfit.report.analysis import (
    confusion_matrix,
    learning_series,
    natural_key,
    per_class,
    prediction_confidence,
    truncate_prompt,
    wrong_predictions,
)
from taskfit.report.blocks import Figure, Section, Subheading, Table
from taskfit.report.costs import memory_note
from taskfit.report.data import LabelGroup
from taskfit.report.markdown import render_markdown
from taskfit.report.sections import _label_folder
from taskfit.rundir import CellResult, load_cells

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
MD_IMG = re.compile(r"!\[[^\]]*\]\((report_files/[^)]+\.png)\)")

CLS_GRID = """\
name: cls-grid
task:
  type: classification
  data: {train: cls_train.csv, test: cls_small.csv}
seeds: [0, 1]
runs:
  zero:
    prompt:
      template: "Review: {{ text }}\\nSentiment: {{ answer }}"
  two-shot:
    prompt:
      template: "Review: {{ text }}\\nSentiment: {{ answer }}"
      shots: 2
      demos: random
"""

MC_SINGLE = """\
name: mc-single
task:
  type: multiple_choice
  data: {train: mc_train.jsonl, test: mc_small.jsonl}
  choices: choices
  label: answer
runs:
  only:
    prompt:
      template: "<b>Question</b>: {{ question }}\\nAnswer: {{ answer }}"
"""

CLS_PLOTS = {"accuracy-by-run", "confusion-01-zero", "confusion-02-two-shot", "reliability", "learning-curve"}
CLS_PLOTS |= {"cost", "seed-spread"}
MC_PLOTS = {"accuracy-by-run", "reliability", "cost"}


def _experiment(write_yaml, fake_lm, project: Path, text: str) -> Path:
    out = project / "out"
    taskfit.run(write_yaml(text), lm=fake_lm(), out=out)
    return out


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(b64, validate=True) for b64 in IMG.findall(html)]


def _table(html: str, name: str) -> str:
    start = html.index(f'id="table-{name}"')
    return html[start : html.index("</table>", start)]


def _figure_names(html: str) -> set[str]:
    return set(re.findall(r'<figure id="figure-([^"]+)">', html))


@pytest.fixture
def cls_dir(write_yaml, fake_lm, project) -> Path:
    return _experiment(write_yaml, fake_lm, project, CLS_GRID)


def test_classification_grid_report(cls_dir: Path):
    path = write_report(cls_dir)
    assert path == cls_dir / "report.html"
    html = path.read_text(encoding="utf-8")
    results = json.loads((cls_dir / "results.json").read_text(encoding="utf-8"))
    assert 'id="table-results"' in html and 'id="table-comparisons"' in html
    for label, result in results.items():
        assert f"<td>{label}</td>" in html
        for metric in ("accuracy", "macro_f1"):
            assert f"{result[metric]:.3f} ± {result[metric + '_std']:.3f}" in html
    assert _figure_names(html) == CLS_PLOTS
    images = _images(html)
    assert len(images) == len(CLS_PLOTS)
    assert all(png.startswith(PNG_MAGIC) for png in images)
    for section in ("per-class", "calibration", "learning-curve", "cost", "sensitivity", "errors"):
        assert f'<section id="{section}">' in html
    _check_markdown(cls_dir, CLS_PLOTS)
    (manifest_path,) = (cls_dir / "zero").glob("*/seed-0/manifest.json")
    macro_f1 = json.loads(manifest_path.read_text(encoding="utf-8"))["metrics"]["macro_f1"]
    table = html[html.index('id="table-per-class-zero"') :]
    assert f"{macro_f1:.3f}" in table[table.index("macro average") : table.index("</tr>", table.index("macro average"))]


def _check_markdown(folder: Path, plots: set[str]) -> None:
    md = (folder / "report.md").read_text(encoding="utf-8")
    files = MD_IMG.findall(md)
    assert {Path(f).stem for f in files} == plots
    for name in files:
        assert (folder / name).read_bytes().startswith(PNG_MAGIC)
    assert "| run | n | seeds | accuracy |" in md
    assert sorted(p.name for p in (folder / "report_files").iterdir()) == sorted(Path(f).name for f in files)


def _add_finetuning_cell(folder: Path) -> None:
    """A cell as fine-tuning runs will write it (copied from a prompting cell), without option scores."""
    no_scores = {"scores", "probabilities", "normalized_scores"}
    (source,) = (folder / "zero").glob("*/seed-0")
    target = folder / "ft" / "tiny" / "seed-0"
    target.mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text(encoding="utf-8"))
    finetune = {"method": "lora", "epochs": 1}
    info = {"train_time_s": 12.5, "train_tokens_per_s": 3400.0}  # what a fine-tuning run records
    manifest.update(run="ft", label="ft", folder="ft/tiny/seed-0", finetune=info, train_size=9)
    manifest.update(trainable_parameters=4096, config={"finetune": finetune})
    (target / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    rows = [json.loads(line) for line in (source / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    lines = [json.dumps({k: v for k, v in row.items() if k not in no_scores}) for row in rows]
    (target / "predictions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_stored_comparison_no_results_json_and_a_finetuning_cell(cls_dir: Path):
    """comparison.json is shown as stored, with too-small differences flagged; without
    results.json the results come from the cells' manifests; a fine-tuning cell joins the
    learning curve and the cost plot, and is left out of calibration (it has no scores)."""
    rows = [
        {"metric": "accuracy", "a": "zero", "b": "two-shot", "seed": 0, "n": 8, "a_value": 0.5, "b_value": 0.25,
         "difference": 0.25, "ci95": [-0.1, 0.6], "p_value": 0.4, "test": "mcnemar_exact", "p_adjusted": 0.8,
         "mdd": 0.7},
        {"metric": "accuracy", "a": "zero", "b": "two-shot", "seed": 1, "n": 8, "a_value": 0.9, "b_value": 0.1,
         "difference": 0.8, "ci95": [0.5, 1.0], "p_value": 0.0004, "test": "mcnemar_exact", "p_adjusted": 0.0008,
         "mdd": 0.7},
    ]  # fmt: skip
    results = json.loads((cls_dir / "results.json").read_text(encoding="utf-8"))
    (cls_dir / "results.json").unlink()
    _add_finetuning_cell(cls_dir)
    stored = {"comparisons": rows, "cells": fingerprints(load_cells([cls_dir]))}  # computed from these cells
    (cls_dir / "comparison.json").write_text(json.dumps(stored), encoding="utf-8")
    html = write_report(cls_dir).read_text(encoding="utf-8")
    table = _table(html, "comparisons")
    assert table.count("<tr") == 3  # header + the two stored rows
    assert table.count('class="flag"') == 1 and "test set too small to tell" in table
    assert "0.800" in table and "&lt; 0.001" in table
    for label, result in results.items():
        assert f"<td>{label}</td>" in html and f"{result['accuracy']:.3f} ± {result['accuracy_std']:.3f}" in html
    assert _figure_names(html) == CLS_PLOTS | {"confusion-03-ft"}
    assert "<td>training examples</td>" in _table(html, "learning-curve")
    assert "<td>ft</td>" in _table(html, "results") and "<td>ft</td>" not in _table(html, "calibration")
    cost = _table(html, "cost")
    assert "training tokens/s" in cost and '<td class="num">12.5</td><td class="num">3,400</td>' in cost


def test_single_cell_multiple_choice(write_yaml, fake_lm, project):
    out = _experiment(write_yaml, fake_lm, project, MC_SINGLE)
    had_pyplot = "matplotlib.pyplot" in sys.modules
    html = write_report(out).read_text(encoding="utf-8")
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules  # no global matplotlib state touched
    assert _figure_names(html) == MC_PLOTS
    assert all(png.startswith(PNG_MAGIC) for png in _images(html))
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))["only"]
    low, high = result["accuracy_ci95"]
    assert f"{result['accuracy']:.3f} [{low:.3f}, {high:.3f}]" in html
    assert 'id="table-comparisons"' not in html and 'id="per-class"' not in html
    assert "&lt;b&gt;Question&lt;/b&gt;" in html and "<b>Question</b>" not in html  # prompts are escaped
    _check_markdown(out, MC_PLOTS)


def test_helpers():
    assert sorted(["c10", "c2", "c1"], key=natural_key) == ["c1", "c2", "c10"]
    long = "x" * 1000 + "y" * 1500
    assert truncate_prompt(long) == "…" + "y" * 1500 and truncate_prompt("short") == "short"
    rows = [{"id": f"e{i}", "correct": i % 2 == 0} for i in (12, 3, 5, 1, 7, 9, 11, 2)]
    assert [r["id"] for r in wrong_predictions(rows)] == ["e1", "e3", "e5", "e7", "e9"]
    assert wrong_predictions([{"id": "g1", "prediction": "free text"}]) == []  # no `correct`: cannot tell
    voted = {"prediction": "yes", "probabilities": [0.25, 0.75], "scores": [0.0, 0.0]}  # vote shares win
    assert prediction_confidence(voted, ["no", "yes"]) == 0.75
    assert prediction_confidence({"prediction": 1, "scores": [0.0, 0.0]}, []) == 0.5
    assert prediction_confidence({"prediction": 1}, []) is None
    matrix = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    stats = per_class(matrix)
    assert stats[1] == {"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1}
    assert stats[2] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def _report_state(folder: Path) -> tuple[bytes, bytes, dict[str, bytes]]:
    files = folder / "report_files"
    plots = {p.name: p.read_bytes() for p in files.iterdir()} if files.is_dir() else {}
    return (folder / "report.html").read_bytes(), (folder / "report.md").read_bytes(), plots


def _new_numbers(folder: Path) -> None:
    """Change results.json, so that a report written now differs from the one on disk."""
    path = folder / "results.json"
    results = json.loads(path.read_text(encoding="utf-8"))
    results["zero"]["accuracy"] = 0.123
    path.write_text(json.dumps(results), encoding="utf-8")


def test_a_file_where_the_plot_folder_goes_changes_nothing(cls_dir: Path):
    """The refused report writes nothing: report.html is not replaced while report.md stays old."""
    write_report(cls_dir)
    (cls_dir / "report_files").rename(cls_dir / "plots-kept")
    (cls_dir / "report_files").write_bytes(b"mine")
    before = _report_state(cls_dir)
    _new_numbers(cls_dir)
    result = CliRunner().invoke(app, ["report", str(cls_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{cls_dir / 'report_files'}: a file where the report's plot folder goes" in " ".join(result.output.split())
    assert _report_state(cls_dir) == before and (cls_dir / "report_files").read_bytes() == b"mine"
    assert not list(cls_dir.glob(".report-*"))


def test_a_failed_swap_puts_the_old_report_back(cls_dir: Path, monkeypatch):
    """report_files and report.md are already swapped when report.html fails: both go back."""
    write_report(cls_dir)
    (cls_dir / "report_files" / "notes.txt").write_text("my notes", encoding="utf-8")
    (cls_dir / "report_files" / "stale.png").write_bytes(PNG_MAGIC)
    before = _report_state(cls_dir)
    _new_numbers(cls_dir)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == cls_dir / "report.html" and Path(src).parent.name != "old":  # the new one, not the undo
            raise OSError(errno.EACCES, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(TaskfitError, match=re.escape(f"{cls_dir / 'report.html'}: could not write the report")):
        write_report(cls_dir)
    assert _report_state(cls_dir) == before and not list(cls_dir.glob(".report-*"))
    monkeypatch.setattr(output.os, "replace", real_replace)
    assert "0.123" in write_report(cls_dir).read_text(encoding="utf-8")
    plots = {p.name for p in (cls_dir / "report_files").iterdir()}
    assert plots == {f"{name}.png" for name in CLS_PLOTS} | {"notes.txt"}  # stale plot gone, the user's file kept
    assert (cls_dir / "report_files" / "notes.txt").read_text(encoding="utf-8") == "my notes"


@pytest.mark.parametrize("where", ["staging folder", "plot file"])
def test_write_errors_name_the_folder_and_change_nothing(cls_dir: Path, monkeypatch, where: str):
    write_report(cls_dir)
    before = _report_state(cls_dir)
    _new_numbers(cls_dir)

    def fail(*args, **kwargs):
        raise OSError(errno.EACCES if where == "staging folder" else errno.ENOSPC, "cannot write", "somewhere")

    if where == "staging folder":  # a read-only experiment folder
        monkeypatch.setattr(output.tempfile, "mkdtemp", fail)
    else:  # the disk fills up halfway through
        monkeypatch.setattr(Path, "write_bytes", fail)
    with pytest.raises(TaskfitError, match=re.escape(f"{cls_dir}: could not write the report")):
        write_report(cls_dir)
    monkeypatch.undo()
    assert _report_state(cls_dir) == before and not list(cls_dir.glob(".report-*"))


TEMPLATES_SHOTS = """\
name: ens
task:
  type: classification
  data: {train: cls_train.csv, test: cls_small.csv}
runs:
  ens:
    prompt:
      templates: ["Review: {{ text }}\\nSentiment: {{ answer }}", "Text: {{ text }}\\nLabel: {{ answer }}"]
      combine: each
      shots: [0, 2]
"""


def test_learning_curve_keeps_templates_and_demo_sets_apart(write_yaml, fake_lm, project):
    out = _experiment(write_yaml, fake_lm, project, TEMPLATES_SHOTS)
    table = _table(write_report(out).read_text(encoding="utf-8"), "learning-curve")
    assert table.count("<td>ens[k0-t0], ens[k2-t0]</td>") == 2 and table.count("<td>ens[k0-t1], ens[k2-t1]</td>") == 2
    groups = [_group(f"r[k{k}-d{d}]", shots=k, demo_set=d) for d in (0, 1) for k in (1, 4)]
    assert [s.name for s in learning_series(groups, "accuracy")] == ["r[k1-d0], r[k4-d0]", "r[k1-d1], r[k4-d1]"]
    one_x = [_group(f"r[t{t}]", shots=0, template=t) for t in (0, 1)]
    assert learning_series(one_x, "accuracy") == []  # no vertical segment at x=0


def _group(label: str, shots: int, template: int | None = None, demo_set: int | None = None) -> LabelGroup:
    manifest = {"run": "r", "label": label, "model": {"name": "m"}, "template": template, "demo_set": demo_set}
    manifest["config"] = {"prompt": {"shots": shots, "templates": ["a", "b"], "combine": "each"}}
    return LabelGroup(label, {"accuracy": 0.5}, [CellResult(Path(label), manifest, [])])


MARKUP_CLASSES = ["<b>pos|itive</b>", "neu*tral*", "neg_[1](x)"]
MARKUP_YAML = """\
name: markup
task:
  type: classification
  data: {train: markup_train.csv, test: markup_test.csv}
runs:
  zero_shot:
    prompt:
      template: "Review: {{ text }}\\nSentiment: {{ answer }}"
"""


def test_markdown_escapes_user_text(write_yaml, fake_lm, project):
    """Class names with Markdown and HTML in them: plain text in report.md, and tables keep their columns."""
    for split in ("train", "test"):
        rows = ["id,text,label"] + [f"{split}{i},Review {split} {i}.,{MARKUP_CLASSES[i % 3]}" for i in range(6)]
        (project / f"markup_{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = _experiment(write_yaml, fake_lm, project, MARKUP_YAML)
    write_report(out)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "<b>" not in md and "neu*tral*" not in md and "[1](x)" not in md
    assert "\\<b\\>pos\\|itive\\</b\\>" in md and "neu\\*tral\\*" in md and "neg\\_\\[1\\](x)" in md
    for line in md.splitlines():
        if line.startswith("| ") and ("pos" in line or "neu" in line or "neg" in line):
            assert len(re.split(r"(?<!\\)\|", line)) == 7, line  # 5 cells of the per-class table
    table = Table(["run", "accuracy"], [["a`b`c", "0.650 [0.517, 0.767]"]], numeric=[False, True])
    section = Section("s", "S", [Subheading("<i>x</i>"), table, Figure("f", "[t](u)", b"", "*c*")])
    md = render_markdown("_t_ v_1", [section])
    assert "| a\\`b\\`c | 0.650 [0.517, 0.767] |" in md  # the report's numbers stay as they are
    assert "### \\<i\\>x\\</i\\>" in md and "![\\[t\\](u)](report_files/f.png)" in md and "# \\_t\\_ v_1" in md


def test_missing_run_folder_is_named(cls_dir: Path):
    shutil.rmtree(cls_dir / "two-shot")
    html = write_report(cls_dir).read_text(encoding="utf-8")
    note = f"results.json lists two-shot, but its folder {cls_dir / 'two-shot'} is missing."
    overview = html[html.index('<section id="overview">') : html.index("</section>")]
    comparisons = html[html.index('<section id="comparisons">') :]
    assert note in overview and note in comparisons[: comparisons.index("</section>")]
    assert "results.json lists two\\-shot" not in (md := (cls_dir / "report.md").read_text(encoding="utf-8"))
    assert "results.json lists two-shot, but its folder" in md and "is missing." in md
    assert _label_folder(cls_dir, "ens[k0-t1]@tiny") == cls_dir / "ens" / "k0-t1" / "tiny"


def test_memory_text_follows_the_manifests_scope(cls_dir: Path):
    manifests = sorted(cls_dir.rglob("manifest.json"))
    for scope in ("cell", None):
        for path in manifests:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            manifest["peak_memory_mb"].pop("cpu_rss_scope", None)
            if scope:
                manifest["peak_memory_mb"]["cpu_rss_scope"] = scope
            path.write_text(json.dumps(manifest), encoding="utf-8")
        html = write_report(cls_dir).read_text(encoding="utf-8")
        cost = html[html.index('<section id="cost">') :]
        cost = cost[: cost.index("</section>")]
        assert ("measured within each cell" in cost) == (scope == "cell")
        assert ("peak includes earlier ones" in cost) == (scope is None)
    mixed = memory_note([{"peak_memory_mb": {"cpu_rss_scope": "cell"}}, {"peak_memory_mb": {"cpu_rss": 1.0}}])
    assert "For 1 of 2 cells it is measured within the cell" in mixed and "includes earlier ones" in mixed


def test_train_sizes_make_one_curve_with_all_at_its_number_of_examples():
    """A fine-tuning run's sizes are one series (its settings, not its training figures, key it),
    and `all` sits at the number of examples it trained on."""
    from taskfit.report.analysis import learning_series

    def group(size, examples, seconds):
        config = {"finetune": {"method": "lora", "train_sizes": [4, 8, "all"]}}
        manifest = {"run": "ft", "label": f"ft[n{size}]", "model": {"name": "m"}, "train_size": size,
                    "train_examples": examples, "finetune": {"train_time_s": seconds}, "config": config}  # fmt: skip
        return LabelGroup(manifest["label"], {"accuracy": 0.5}, [CellResult(Path(manifest["label"]), manifest, [])])

    (series,) = learning_series([group(4, 4, 1.0), group(8, 8, 2.5), group("all", 12, 4.0)], "accuracy")
    assert [x for x, *_ in series.points] == [4.0, 8.0, 12.0]
