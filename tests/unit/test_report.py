"""`taskfit.report.write_report` on experiment folders written by `taskfit.run` with the fake LM."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import taskfit
from taskfit.report import write_report
from taskfit.report.analysis import (
    confusion_matrix,
    natural_key,
    per_class,
    prediction_confidence,
    truncate_prompt,
    wrong_predictions,
)

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
    manifest.update(run="ft", label="ft", folder="ft/tiny/seed-0", finetune=finetune, train_size=9)
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
    (cls_dir / "comparison.json").write_text(json.dumps({"comparisons": rows}), encoding="utf-8")
    results = json.loads((cls_dir / "results.json").read_text(encoding="utf-8"))
    (cls_dir / "results.json").unlink()
    _add_finetuning_cell(cls_dir)
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
