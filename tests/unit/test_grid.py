"""The experiment grid: runs × models × seeds, cell folders and seed aggregation."""

from __future__ import annotations

import json
import re

import pytest

import taskfit
from taskfit.config import ModelConfig, RunConfig
from taskfit.errors import TaskfitError
from taskfit.experiment import grid

RUNS = """
runs:
  zero:
    prompt: {template: "Question: {{ question }}\\nAnswer: {{ answer }}"}
  two-shot:
    prompt: {template: "Question: {{ question }}\\nAnswer: {{ answer }}", shots: 2, demos: random}
"""


def _yaml(project, head: str) -> str:
    text = (project / "mc.yaml").read_text()
    text = text[: text.index("runs:")] + head + RUNS
    (project / "grid.yaml").write_text(text)
    return str(project / "grid.yaml")


def test_seeds_repeat_every_run_and_report_mean_and_std(project, fake_lm):
    path = _yaml(project, "seeds: [0, 1, 2]\n")
    results = taskfit.run(path, out=project / "out", lm=fake_lm())
    two = results["two-shot"]
    per_seed = [two["per_seed"][s]["accuracy"] for s in ("0", "1", "2")]
    assert two["accuracy"] == pytest.approx(sum(per_seed) / 3)
    assert two["seeds"] == [0, 1, 2] and two["accuracy_min"] == min(per_seed)
    for seed in (0, 1, 2):
        manifest = json.loads(
            (project / "out" / "zero" / "smollm2-135m-instruct" / f"seed-{seed}" / "manifest.json").read_text()
        )
        assert manifest["seed"] == seed and manifest["run"] == "zero"
    demos = {
        s: (project / "out" / "two-shot" / "smollm2-135m-instruct" / f"seed-{s}" / "predictions.jsonl").read_text()
        for s in (0, 1)
    }
    assert demos[0] != demos[1]  # random demos are drawn per seed


def test_zero_shot_is_identical_across_seeds_and_scored_once(project, fake_lm):
    lm = fake_lm()
    results = taskfit.run(_yaml(project, "seeds: [0, 1]\n"), out=project / "out", lm=lm, only=["zero"])
    assert results["zero"]["accuracy_std"] == 0.0
    assert len(lm.requests) == len(set(lm.requests))  # the second seed came from the cache


def test_models_grid_labels_cells_by_model(project):
    models = [ModelConfig(name="smollm2-135m-instruct"), ModelConfig(name="/data/my-finetuned")]
    runs = {"a": RunConfig.model_validate({"prompt": {"template": "{{ answer }}"}})}
    cells = grid(models, runs, [0])
    assert [c.label for c in cells] == ["a@smollm2-135m-instruct", "a@my-finetuned"]
    assert [c.folder for c in cells] == ["a/smollm2-135m-instruct/seed-0", "a/my-finetuned/seed-0"]


def test_run_with_its_own_model_is_not_crossed_with_the_grid():
    models = [ModelConfig(name="m1"), ModelConfig(name="m2")]
    runs = {
        "a": RunConfig.model_validate({"prompt": {"template": "{{ answer }}"}}),
        "b": RunConfig.model_validate({"prompt": {"template": "{{ answer }}"}, "model": "m3"}),
    }
    cells = grid(models, runs, [0, 1])
    assert sorted({c.label for c in cells}) == ["a@m1", "a@m2", "b"]
    assert {c.folder for c in cells if c.run == "b"} == {"b/m3/seed-0", "b/m3/seed-1"}


def test_same_model_in_two_dtypes_gets_two_slugs():
    models = [ModelConfig(name="m", dtype="float32"), ModelConfig(name="m", dtype="bfloat16")]
    runs = {"a": RunConfig.model_validate({"prompt": {"template": "{{ answer }}"}})}
    assert [c.label for c in grid(models, runs, [0])] == ["a@m-float32", "a@m-bfloat16"]


@pytest.mark.parametrize(
    "head, key",
    [("model: a\nmodels: [b]\n", "`model` (one) or `models`"), ("seed: 1\nseeds: [1, 2]\n", "`seed` (one) or `seeds`")],
)
def test_one_and_many_conflict(project, head, key):
    with pytest.raises(TaskfitError, match=re.escape(key)):
        taskfit.load_experiment(_yaml(project, head))


def test_mlflow_tracking_logs_every_cell(project, fake_lm):
    from mlflow.tracking import MlflowClient

    text = (project / "mc.yaml").read_text().replace("runs:", "seeds: [0, 1]\ntracking: mlflow\nruns:")
    (project / "tracked.yaml").write_text(text)
    results = taskfit.run(project / "tracked.yaml", out=project / "out", lm=fake_lm())
    client = MlflowClient(tracking_uri=(project / "out" / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("mc").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["zero seed 0", "zero seed 1"]
    logged = {r.data.params["seed"]: r.data.metrics["accuracy"] for r in runs}
    assert logged == {str(s): results["zero"]["per_seed"][str(s)]["accuracy"] for s in (0, 1)}
    assert runs[0].data.params["config.prompt.template"].startswith("Question:")
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert artifacts == {"manifest.json", "predictions.jsonl"}
