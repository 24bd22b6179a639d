"""Fine-tuning runs in the grid, with the recipe replaced by a recording fake: nested
train subsets, the same test split and files as prompt runs, the cost in the manifest."""

from __future__ import annotations

import json

import pytest

import taskfit
import taskfit.finetuning as finetuning
from taskfit.errors import TaskfitError
from taskfit.finetuning import FinetuneResult


@pytest.fixture
def recorded(monkeypatch):
    jobs = []

    def fake_run(job):
        jobs.append(job)
        rows = [
            {
                "id": ex.id,
                "label": ex.gold_text,
                "prediction": ex.options[0],
                "correct": ex.gold == 0,
                "scores": [0.0] * len(ex.options),
                "probabilities": [1 / len(ex.options)] * len(ex.options),
                "prompt": ex.fields["text"],
            }
            for ex in job.test
        ]
        return FinetuneResult(rows, {"trainable_parameters": 1234, "total_parameters": 99999})

    monkeypatch.setattr(finetuning, "run_finetune", fake_run)
    return jobs


def _experiment(project, runs: str) -> str:
    text = (project / "cls.yaml").read_text()
    (project / "ft.yaml").write_text(text[: text.index("runs:")] + "runs:\n" + runs)
    return str(project / "ft.yaml")


def test_train_sizes_are_nested_subsets_with_one_cell_each(project, fake_lm, recorded):
    path = _experiment(project, "  lora:\n    model: minilm\n    finetune: {method: lora, train_sizes: [3, 6, all]}\n")
    results = taskfit.run(path, out=project / "out", lm=fake_lm())
    trains = [[ex.id for ex in job.task.split("train")] for job in recorded]
    devs = [[ex.id for ex in job.task.split("dev")] for job in recorded]
    assert [len(t) for t in trains] == [3, 6, 8]  # 9 train examples, one held out as dev first
    assert trains[1][:3] == trains[0] and set(trains[1]) <= set(trains[2])  # nested
    assert devs[0] == devs[1] == devs[2] and len(devs[0]) == 1 and not set(devs[0]) & set(trains[2])
    assert list(results) == ["lora[n3]", "lora[n6]", "lora[nall]"]  # settings, not variants: no mean over them
    manifest = json.loads((project / "out" / "lora" / "n3" / "manifest.json").read_text())
    assert manifest["train_size"] == 3 and manifest["train_examples"] == 3
    assert manifest["trainable_parameters"] == 1234 and manifest["config"]["finetune"]["method"] == "lora"
    assert manifest["model"]["name"] == "minilm"


def test_prompt_and_finetune_runs_share_the_test_split(project, fake_lm, recorded):
    path = _experiment(
        project,
        '  zero:\n    prompt: {template: "Review: {{ text }}\\nSentiment: {{ answer }}"}\n'
        "  full:\n    model: minilm\n    finetune: {method: full, epochs: 1}\n",
    )
    results = taskfit.run(path, out=project / "out", lm=fake_lm())
    assert set(results) == {"zero", "full"}
    ids = {
        run: [json.loads(x)["id"] for x in (project / "out" / run / "predictions.jsonl").read_text().splitlines()]
        for run in ("zero", "full")
    }
    assert ids["zero"] == ids["full"] == [ex.id for ex in recorded[0].test]
    from taskfit.compare import compare_cells
    from taskfit.rundir import load_cells

    assert compare_cells(load_cells([project / "out"]))["comparisons"]  # both routes compare on the same items


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ("  a:\n    finetune: {method: lora, learning_rate: fast}\n", "learning_rate"),
        ("  a:\n    finetune: {method: qlora}\n", "qlora needs a CUDA GPU"),
        ("  a:\n    finetune: {train_sizes: [100]}\n", "more than the 8 train examples left after holding out a dev"),
        ('  a:\n    prompt: {template: "{{ answer }}"}\n    finetune: {method: lora}\n', "exactly one"),
    ],
)
def test_finetune_config_errors(project, runs, message):
    with pytest.raises(TaskfitError, match=message):
        taskfit.experiment.plan(_experiment(project, runs))


def test_a_finetuning_template_is_checked_at_validation_or_said_to_be_unused(project, caplog):
    """Multiple choice (and generation) prompt a decoder LM with it: a misspelt field is named
    before training; a classification head never reads it: a syntax error is still an error,
    and a valid one is said to be unused."""
    text = (project / "mc.yaml").read_text()
    (project / "ft_mc.yaml").write_text(
        text[: text.index("runs:")] + 'runs:\n  a:\n    finetune: {template: "{{ questoin }} {{ answer }}"}\n'
    )
    with pytest.raises(TaskfitError, match="questoin"):
        taskfit.experiment.plan(project / "ft_mc.yaml")
    with pytest.raises(TaskfitError, match=r"runs.a.finetune.template: template syntax error"):
        taskfit.experiment.plan(_experiment(project, '  a:\n    finetune: {template: "{{ text  {{ answer }}"}\n'))
    taskfit.experiment.plan(_experiment(project, '  a:\n    finetune: {template: "{{ text }} {{ answer }}"}\n'))
    assert "runs.a.finetune.template: not used: classification fine-tuning" in caplog.text


def test_training_on_test_examples_is_warned_about(project, caplog):
    test = (project / "cls_small.csv").read_text().splitlines()
    with (project / "cls_train.csv").open("a") as f:
        f.write("\n".join(f"leak{i}," + line.split(",", 1)[1] for i, line in enumerate(test[1:3])) + "\n")
    taskfit.experiment.plan(_experiment(project, "  a:\n    finetune: {method: lora}\n"))
    assert "runs.a.finetune: 2 train example(s) also occur in the test split" in caplog.text


def test_a_finished_cell_is_not_trained_again_unless_what_it_depends_on_changed(project, fake_lm, recorded):
    """Adding a seed or re-running the same command trains only what is new (as prompting's
    cache computes only what is new); other settings, data or test items train again."""
    path = _experiment(project, "  lora:\n    model: minilm\n    finetune: {method: lora, epochs: 1}\n")
    first = taskfit.run(path, out=project / "out", lm=fake_lm())
    assert len(recorded) == 1
    assert taskfit.run(path, out=project / "out", lm=fake_lm()) == first and len(recorded) == 1
    taskfit.run(path, out=project / "out", lm=fake_lm(), limit=4)  # other test items
    assert len(recorded) == 2
    taskfit.run(_experiment(project, "  lora:\n    model: minilm\n    finetune: {method: lora, epochs: 2}\n"),
                out=project / "out", lm=fake_lm(), limit=4)  # fmt: skip
    assert len(recorded) == 3


def test_a_finetuning_template_is_rendered_on_test_examples_too(project):
    """A field every train row has but a test row lacks fails at validation, not after training."""
    rows = [json.loads(line) for line in (project / "mc_train.jsonl").read_text().splitlines()]
    (project / "mc_train.jsonl").write_text("".join(json.dumps({**r, "hint": "h"}) + "\n" for r in rows))
    text = (project / "mc.yaml").read_text()
    (project / "ft_mc.yaml").write_text(
        text[: text.index("runs:")]
        + 'runs:\n  a:\n    finetune: {template: "{{ hint }} {{ question }} {{ answer }}"}\n'
    )
    with pytest.raises(TaskfitError, match=r"mc_small.jsonl.*hint|hint.*mc_small.jsonl"):
        taskfit.experiment.plan(project / "ft_mc.yaml")


def test_truncated_training_inputs_and_a_missing_gpu_are_named(project, fake_lm, monkeypatch, caplog):
    from taskfit import finetune_cell

    def fake_run(job):
        rows = [{"id": ex.id, "label": ex.gold_text, "prediction": ex.options[0], "correct": ex.gold == 0,
                 "prompt": ex.fields["text"]} for ex in job.test]  # fmt: skip
        return FinetuneResult(rows, {"trainable_parameters": 1, "truncated_inputs": 3})

    monkeypatch.setattr(finetuning, "run_finetune", fake_run)
    taskfit.run(_experiment(project, "  a:\n    finetune: {max_length: 16}\n"), out=project / "out", lm=fake_lm())
    assert "runs.a.finetune: 3 input(s) were longer than max_length (16 tokens) and were cut" in caplog.text
    if not __import__("torch").cuda.is_available():
        with pytest.raises(TaskfitError, match="runs.a.finetune: model.device: cuda, but this torch sees no CUDA GPU"):
            finetune_cell._check_device("cuda", "runs.a.finetune")
