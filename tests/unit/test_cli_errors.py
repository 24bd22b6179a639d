"""The command line: user errors exit with status 2 and a message, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import taskfit.models
from taskfit.cli import app
from taskfit.errors import TaskfitError


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if anything tries to load a real model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(taskfit.models, "load_model", refuse)
    # the transformers backend must not even be imported (it pulls in torch)
    monkeypatch.delitem(sys.modules, "taskfit.models.hf", raising=False)


def break_yaml(project, old, new):
    path = project / "mc.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


BAD_INPUTS = {
    "unknown key": (("  label: answer", "  lable: answer"), "Did you mean 'label'?"),
    "missing data file": (("test: mc_small.jsonl", "test: missing.jsonl"), "missing.jsonl: data file not found"),
    "template field": (("{{ question }}", "{{ questoin }}"), "questoin"),
    "invalid yaml": (("runs:", "runs: ["), "not valid YAML"),
    "too many shots": (('{{ answer }}"', '{{ answer }}"\n      shots: 50'), "runs.zero.prompt.shots"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("command", ["run", "validate"])
def test_bad_input_exits_2_with_message(project, runner, no_model, case, command):
    (old, new), expected = BAD_INPUTS[case]
    path = break_yaml(project, old, new)
    result = runner.invoke(app, [command, str(path)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr
    assert expected in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, BaseException) or isinstance(result.exception, SystemExit)


def test_malformed_data_line_exits_2(project, runner, no_model):
    with (project / "mc_small.jsonl").open("a") as f:
        f.write("{not json}\n")
    result = runner.invoke(app, ["validate", str(project / "mc.yaml")])
    assert result.exit_code == 2
    assert "mc_small.jsonl, line 9" in result.stderr


def test_missing_experiment_file_exits_2(tmp_path, runner, no_model):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "no such experiment file" in result.stderr


def test_unknown_only_exits_2_with_suggestion(project, runner, no_model):
    result = runner.invoke(app, ["run", str(project / "mc.yaml"), "--only", "zer0"])
    assert result.exit_code == 2
    assert "Did you mean 'zero'?" in result.stderr
    assert "Traceback" not in result.output


def test_latin1_data_file_exits_2(project, runner, no_model):
    """Data files exported from spreadsheets are often not UTF-8: a user error, not a crash."""
    (project / "cls_small.csv").write_bytes("id,text,label\nc1,caf\xe9 cr\xe8me,positive\n".encode("latin-1"))
    result = runner.invoke(app, ["validate", str(project / "cls.yaml")])
    assert result.exit_code == 2, result.output
    assert "cls_small.csv" in result.stderr
    assert "Traceback" not in result.output


def test_validate_good_file_without_loading_a_model(project, runner, no_model):
    result = runner.invoke(app, ["validate", str(project / "mc.yaml")])
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout
    assert "train: 6" in result.stdout and "test: 8" in result.stdout
    assert "runs: zero" in result.stdout
    assert "taskfit.models.hf" not in sys.modules


def test_run_prints_table_and_writes_results(project, runner, monkeypatch, fake_lm):
    lm = fake_lm()
    monkeypatch.setattr(taskfit.models, "load_model", lambda config=None: lm)
    out = project / "out"
    result = runner.invoke(app, ["run", str(project / "cls.yaml"), "--out", str(out), "--limit", "4"])
    assert result.exit_code == 0, result.output
    assert "macro_f1" in result.stdout
    assert "zero" in result.stdout
    assert (out / "results.json").is_file()
    assert len(lm.requests) == 12


def test_run_table_shows_the_spread_across_templates(project, runner, monkeypatch, fake_lm):
    text = (project / "cls.yaml").read_text()
    text = text[: text.index("runs:")] + (
        "seeds: [0, 1]\nruns:\n  each:\n    prompt:\n      combine: each\n"
        '      templates: ["Text: {{ text }} Label: {{ answer }}", "{{ text }} It was {{ answer }}"]\n'
    )
    (project / "each.yaml").write_text(text)
    monkeypatch.setattr(taskfit.models, "load_model", lambda config=None: fake_lm())
    args = ["run", str(project / "each.yaml"), "--out", str(project / "out"), "--limit", "4"]
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "(2 variants)" in result.stdout and "(2 seeds)" in result.stdout
    assert "each[t0]" in result.stdout and "each[t1]" in result.stdout  # the labels, not markup
    header = next(line for line in result.stdout.splitlines() if "accuracy" in line)
    assert header.count("accuracy") == 1  # one column per metric


def test_error_text_in_brackets_is_printed_as_written(capsys):
    from taskfit import cli

    with pytest.raises(typer.Exit) as exit_info:
        cli._fail(TaskfitError("runs.each[t0]: the answer [MASK] is not a label"))
    assert exit_info.value.exit_code == 2
    assert "runs.each[t0]: the answer [MASK] is not a label" in capsys.readouterr().err  # not taken for markup


def run_module(*args, cwd, env_extra=None):
    env = {**os.environ, "COLUMNS": "200", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "taskfit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_module_entry_point_bad_input(project):
    path = break_yaml(project, "  label: answer", "  lable: answer")
    proc = run_module("run", str(path), cwd=project)
    assert proc.returncode == 2
    assert "Did you mean 'label'?" in proc.stderr
    assert "line 8" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_models_lists_the_default_alias(tmp_path):
    proc = run_module("models", cwd=tmp_path, env_extra={"TASKFIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m-instruct" in proc.stdout


def test_no_arguments_shows_help(runner):
    result = runner.invoke(app, [])
    assert "run" in result.output and "validate" in result.output and "models" in result.output


@pytest.mark.parametrize(("code", "status"), [(None, 0), (2, 2), ("a message", 1)])
def test_leaving_runs_what_an_ordinary_exit_runs(code, status, tmp_path):
    """The CLI ends without the interpreter's teardown: its threads still finish, its atexit
    handlers still run, its buffered output is still written, and the status is sys.exit's."""
    script = f"""
import atexit, threading, time, sys
from pathlib import Path
from taskfit.cli import _leave
out = Path({str(tmp_path)!r})
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
atexit.register(lambda: (out / "atexit").write_text("done"))
sys.stdout.write("buffered, no newline")
_leave({code!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "done"
    assert ("a message" in proc.stderr) is (code == "a message")


def test_run_never_writes_over_the_experiment_file_or_a_users_files(project, runner, monkeypatch, fake_lm):
    """Checked before anything is computed: the experiment file kept inside the output folder (it
    would become <out>/config.yaml), a file where the folder goes, a results.json or config.yaml
    that taskfit did not write."""
    monkeypatch.setattr(taskfit.models, "load_model", lambda config=None: fake_lm())
    inside = project / "runs" / "cls"
    inside.mkdir(parents=True)
    text = (project / "cls.yaml").read_text().replace("cls_small.csv", "../../cls_small.csv")
    (inside / "config.yaml").write_text(text.replace("cls_train.csv", "../../cls_train.csv"))
    before = (inside / "config.yaml").read_text()
    result = runner.invoke(app, ["run", str(inside / "config.yaml"), "--out", str(inside), "--limit", "4"])
    assert result.exit_code == 2 and "experiment file is in the run's output folder" in result.stderr
    assert (inside / "config.yaml").read_text() == before and not (inside / "results.json").exists()

    users = project / "mine"
    users.mkdir()
    for name, content in (("results.json", '{"my": "stuff"}'), ("config.yaml", "colour: blue\n")):
        (users / name).write_text(content)
        result = runner.invoke(app, ["run", str(project / "cls.yaml"), "--out", str(users), "--limit", "4"])
        assert result.exit_code == 2 and f"{name} written by taskfit" in result.stderr, result.output
        assert (users / name).read_text() == content
        (users / name).unlink()
    (project / "afile").write_text("x")
    result = runner.invoke(app, ["run", str(project / "cls.yaml"), "--out", str(project / "afile"), "--limit", "4"])
    assert result.exit_code == 2 and "a file, where the run's output folder goes" in result.stderr


def test_a_cell_whose_predictions_were_replaced_is_unfinished_until_its_manifest(project, monkeypatch, fake_lm):
    """A run that fails after writing a cell's new predictions (here: computing its metrics) must
    not leave them beside the old manifest, which compare and report would read as one cell."""
    from taskfit import cell as cell_module
    from taskfit.rundir import load_cells

    out = project / "out"
    taskfit.run(project / "cls.yaml", out=out, lm=fake_lm(), limit=4)
    assert len(load_cells([out])) == 1

    def fail(*args, **kwargs):
        raise RuntimeError("metrics failed")

    monkeypatch.setattr(cell_module.MetricInputs, "metrics", fail)
    with pytest.raises(RuntimeError):
        taskfit.run(project / "cls.yaml", out=out, lm=fake_lm(), limit=3)
    with pytest.raises(TaskfitError, match="no finished runs"):
        load_cells([out])


def test_load_model_takes_a_name_or_a_mapping_and_names_what_is_wrong(tmp_path):
    from taskfit.models.hf import HFLM

    with pytest.raises(TaskfitError, match="give a ModelConfig, a model name or a dict"):
        taskfit.load_model(42)
    with pytest.raises(TaskfitError, match=r"model.dtype: Input should be"):
        taskfit.load_model({"name": "x", "dtype": "half"})
    with pytest.raises(TaskfitError, match="not a known alias, a local folder"):
        taskfit.load_model("no-such-model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TaskfitError, match="is not a model transformers can load"):
        HFLM.load(taskfit.config.ModelConfig(name=str(tmp_path), device="cpu"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_named():
    from taskfit.models.hf import pick_device

    with pytest.raises(TaskfitError, match="this torch sees no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("cpu") == "cpu" and pick_device("auto") == "cpu"


def test_an_unusable_model_cache_folder_is_named(tmp_path, monkeypatch):
    """The hashes memo is only a speed-up: a damaged one is ignored; a cache path that cannot be
    a folder is named when a GGUF file must be converted into it."""
    from taskfit.models import registry

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "hashes.json").write_text('{"trunc')
    monkeypatch.setenv("TASKFIT_CACHE", str(cache))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc")
    assert len(registry._file_hash(weights)) == 64
    blocked = tmp_path / "blocked"
    blocked.write_text("a file")
    monkeypatch.setenv("TASKFIT_CACHE", str(blocked))
    assert len(registry._file_hash(weights)) == 64  # the memo is not written; nothing fails
    with pytest.raises(TaskfitError, match="cannot write the converted model to the cache folder"):
        registry._convert_gguf(tmp_path / "m.gguf", registry.cache_dir() / "m-abc", "abc")


def test_a_folder_given_as_the_experiment_file_is_named(tmp_path, runner, no_model):
    result = runner.invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 2 and "a folder. Pass the path of your experiment YAML file itself" in result.stderr


def test_a_model_with_a_task_head_is_refused_for_prompting(tmp_path):
    """A classification model a fine-tuning run exported loads as a causal LM with a random (or
    untrained) LM head: prompting it would score noise, so it is refused."""
    import json

    from helpers.tiny import build_tiny_model
    from taskfit.models.hf import HFLM

    folder = build_tiny_model(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(TaskfitError, match="LlamaForSequenceClassification: a model with a task head"):
        HFLM.load(taskfit.config.ModelConfig(name=str(folder), device="cpu"))


def test_a_model_config_field_of_the_wrong_type_is_named_not_a_traceback(tmp_path):
    """transformers (through huggingface_hub) refuses `head_dim: "16"`; its error became a traceback."""
    import json

    from helpers.tiny import build_tiny_model
    from taskfit.models.hf import HFLM

    folder = build_tiny_model(tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "head_dim": "16"}))
    with pytest.raises(TaskfitError, match=r"has a config transformers refuses \(.*head_dim.*config.json"):
        HFLM.load(taskfit.config.ModelConfig(name=str(folder), device="cpu"))
