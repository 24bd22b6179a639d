"""Orchestration with a fake LM: outputs, --only / --limit, resume from the cache."""

from __future__ import annotations

import json
import math

import pytest

import taskfit
from taskfit import TaskfitError
from taskfit.models.base import Request

TWO_RUNS = """\
name: two
task:
  type: multiple_choice
  data: {train: mc_train.jsonl, test: mc_small.jsonl}
  choices: choices
  label: answer
runs:
  plain:
    prompt:
      template: "Question: {{ question }}\\nAnswer: {{ answer }}"
  fewshot:
    prompt:
      template: "Q: {{ question }}\\nA: {{ answer }}"
      shots: 2
"""


def oracle_for(project, wrong_ids=()):
    """A scorer that prefers each test question's gold option, except for `wrong_ids`."""
    rows = [json.loads(line) for line in (project / "mc_small.jsonl").read_text().splitlines()]
    gold = {r["question"]: (r["choices"][r["answer"]], r["id"]) for r in rows}

    def score(req: Request) -> float:
        for question, (answer, qid) in gold.items():
            if req.context == f"Question: {question}\nAnswer: ":
                hit = req.continuation == answer
                return -1.0 if hit != (qid in wrong_ids) else -3.0
        return -5.0

    return score


def test_results_and_predictions_multiple_choice(project, fake_lm, read_jsonl):
    lm = fake_lm(fn=oracle_for(project, wrong_ids={"m2", "m5"}))
    out = project / "out"
    results = taskfit.run(project / "mc.yaml", lm=lm, out=out)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    r = results["zero"]
    assert r["n"] == 8
    assert r["accuracy"] == pytest.approx(6 / 8)
    low, high = r["accuracy_ci95"]
    assert 0 <= low <= r["accuracy"] <= high <= 1
    assert "macro_f1" not in r

    rows = read_jsonl(out / "zero" / "predictions.jsonl")
    assert [row["id"] for row in rows] == [f"m{i}" for i in range(1, 9)]
    tests = [json.loads(line) for line in (project / "mc_small.jsonl").read_text().splitlines()]
    for row, ex in zip(rows, tests, strict=True):
        assert {"id", "label", "prediction", "scores", "prompt"} <= set(row)
        assert row["label"] == ex["answer"]
        assert row["prompt"] == f"Question: {ex['question']}\nAnswer: "
        # raw scores, in option order
        assert row["scores"] == [lm.score(Request(row["prompt"], c)) for c in ex["choices"]]
        assert row["prediction"] == max(range(3), key=lambda i: row["scores"][i])
        assert row["correct"] == (row["prediction"] == row["label"])
    assert sum(row["correct"] for row in rows) == 6

    manifest = json.loads((out / "zero" / "manifest.json").read_text())
    assert manifest["examples"] == 8
    assert manifest["requests_computed"] == 24
    assert manifest["model"] == lm.identity
    assert (out / "config.yaml").is_file()


def test_results_classification_has_macro_f1(project, fake_lm, read_jsonl):
    # always answers "positive": accuracy 3/8; F1 = (0 + 0 + 2*3/(3+8)) / 3
    lm = fake_lm({"positive": -0.5, "negative": -2.0, "neutral": -2.0})
    results = taskfit.run(project / "cls.yaml", lm=lm, out=project / "out")
    r = results["zero"]
    assert r["accuracy"] == pytest.approx(3 / 8)
    assert r["macro_f1"] == pytest.approx((6 / 11) / 3)
    assert len(r["macro_f1_ci95"]) == 2
    assert r["macro_f1_ci95"][0] <= r["macro_f1"] <= r["macro_f1_ci95"][1]
    rows = read_jsonl(project / "out" / "zero" / "predictions.jsonl")
    expected = {"id": "c2", "label": "negative", "prediction": "positive", "scores": [-2.0, -2.0, -0.5]}
    assert rows[1] == {**rows[1], **expected}


def test_only_and_limit(project, write_yaml, fake_lm, read_jsonl):
    path = write_yaml(TWO_RUNS)
    out = project / "out"
    lm = fake_lm()
    results = taskfit.run(path, lm=lm, out=out, only=["fewshot"], limit=3)
    assert list(results) == ["fewshot"]
    assert results["fewshot"]["n"] == 3
    assert not (out / "plain").exists()
    assert [r["id"] for r in read_jsonl(out / "fewshot" / "predictions.jsonl")] == ["m1", "m2", "m3"]
    assert len(lm.requests) == 9
    assert all(r.context.startswith("Q: ") for r in lm.requests)


def test_only_keeps_earlier_results_of_other_runs(project, write_yaml, fake_lm):
    path = write_yaml(TWO_RUNS)
    out = project / "out"
    first = taskfit.run(path, lm=fake_lm(), out=out)
    taskfit.run(path, lm=fake_lm(), out=out, only=["plain"], limit=2)
    merged = json.loads((out / "results.json").read_text())
    assert set(merged) == {"plain", "fewshot"}
    assert merged["fewshot"] == first["fewshot"]
    assert merged["plain"]["n"] == 2


def test_unknown_only_name(project, write_yaml, fake_lm):
    lm = fake_lm()
    with pytest.raises(TaskfitError) as info:
        taskfit.run(write_yaml(TWO_RUNS), lm=lm, out=project / "out", only=["fewshto"])
    message = str(info.value)
    assert "--only fewshto" in message
    assert "Did you mean 'fewshot'?" in message
    assert lm.calls == []


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(project, fake_lm, limit):
    with pytest.raises(TaskfitError, match="--limit"):
        taskfit.run(project / "mc.yaml", lm=fake_lm(), out=project / "out", limit=limit)


def test_seed_override_changes_random_demos(project, write_yaml, fake_lm, read_jsonl):
    path = write_yaml(TWO_RUNS.replace("shots: 2", "shots: 2\n      demos: random"))

    def prompts(seed, out):
        taskfit.run(path, lm=fake_lm(), out=project / out, only=["fewshot"], seed=seed, limit=1)
        return read_jsonl(project / out / "fewshot" / "predictions.jsonl")[0]["prompt"]

    assert prompts(1, "a") == prompts(1, "b")
    assert prompts(1, "a") != prompts(2, "c")


def test_results_do_not_depend_on_scoring_order(project, fake_lm):
    """The fake scores each request independently; two fresh runs must agree exactly."""
    a = taskfit.run(project / "cls.yaml", lm=fake_lm(), out=project / "a")
    b = taskfit.run(project / "cls.yaml", lm=fake_lm(), out=project / "b")
    assert a == b


# ---- resume ---------------------------------------------------------------------------------


def cache_file(out):
    [path] = list((out / "cache").glob("*.sqlite"))
    return path


def test_rerun_uses_the_cache(project, write_yaml, fake_lm):
    path, out = write_yaml(TWO_RUNS), project / "out"
    first_lm = fake_lm()
    first = taskfit.run(path, lm=first_lm, out=out)
    assert len(first_lm.requests) == 48 and len(set(first_lm.requests)) == 48
    for run in ("plain", "fewshot"):
        (out / run / "predictions.jsonl").unlink()
    (out / "results.json").unlink()

    again = fake_lm()
    assert taskfit.run(path, lm=again, out=out) == first
    assert again.calls == []
    assert (out / "plain" / "predictions.jsonl").is_file()
    assert json.loads((out / "plain" / "manifest.json").read_text())["requests_computed"] == 0


def test_a_change_in_how_results_are_computed_starts_a_new_cache(project, write_yaml, fake_lm, monkeypatch):
    """Results of another `COMPUTATION` are never reused (nor deleted): resuming across such a
    change would mix two versions' bits."""
    from taskfit import store

    path, out = write_yaml(TWO_RUNS), project / "out"
    first = taskfit.run(path, lm=fake_lm(), out=out)
    old = cache_file(out)
    monkeypatch.setattr(store, "COMPUTATION", store.COMPUTATION + 1)
    again = fake_lm()
    assert taskfit.run(path, lm=again, out=out) == first
    assert len(again.requests) == 48
    assert old.is_file() and len(list((out / "cache").glob("*.sqlite"))) == 2


def test_resume_after_a_kill_recomputes_only_what_is_missing(project, write_yaml, fake_lm):
    """A run killed mid-way has only its finished chunks in the cache; the rerun computes the rest."""
    import sqlite3

    path, out = write_yaml(TWO_RUNS), project / "out"
    first = taskfit.run(path, lm=fake_lm(), out=out)
    with sqlite3.connect(cache_file(out)) as db:
        kept = {k for (k,) in db.execute("SELECT k FROM results ORDER BY k LIMIT 20")}
        db.execute(f"DELETE FROM results WHERE k NOT IN ({','.join('?' * len(kept))})", list(kept))
    (out / "results.json").unlink()

    resumed = fake_lm()
    assert taskfit.run(path, lm=resumed, out=out) == first
    from taskfit.store import request_key

    assert len(resumed.requests) == 48 - 20
    assert not any(request_key(r) in kept for r in resumed.requests)

    third = fake_lm()
    assert taskfit.run(path, lm=third, out=out) == first
    assert third.requests == []  # everything is cached now


def test_a_transaction_cut_by_a_kill_leaves_the_cache_as_it_was(tmp_path):
    """A process killed inside `add` (before its commit) leaves the earlier results intact."""
    import subprocess
    import sys

    from taskfit.models.base import Request
    from taskfit.store import ScoreCache

    cache = ScoreCache(tmp_path / "c.sqlite")
    cache.add({Request("a", " b"): -1.5})
    cache.close()
    code = (
        "import os, sys; from taskfit.store import ScoreCache; from taskfit.models.base import Request\n"
        "c = ScoreCache(__import__('pathlib').Path(sys.argv[1]))\n"
        "c._db.execute('BEGIN'); c._db.executemany('INSERT INTO results VALUES (?, ?)', "
        "[(str(i), '0.0') for i in range(1000)])\n"
        "os._exit(9)  # killed before the commit\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.sqlite")]).returncode == 9
    again = ScoreCache(tmp_path / "c.sqlite")
    assert len(again) == 1 and again.get(Request("a", " b")) == -1.5
    assert again.get(Request("a", " c")) is None


def test_a_different_model_does_not_reuse_the_cache(project, fake_lm):
    out = project / "out"
    taskfit.run(project / "mc.yaml", lm=fake_lm(name="one"), out=out)
    other = fake_lm(name="two")
    taskfit.run(project / "mc.yaml", lm=other, out=out)
    assert len(other.requests) == 24


def test_changing_one_template_recomputes_only_that_run(project, write_yaml, fake_lm):
    out = project / "out"
    first = taskfit.run(write_yaml(TWO_RUNS), lm=fake_lm(), out=out)
    changed = TWO_RUNS.replace(
        '"Q: {{ question }}\\nA: {{ answer }}"', '"Q: {{ question }}\\nBest answer: {{ answer }}"'
    )
    assert changed != TWO_RUNS
    lm = fake_lm()
    second = taskfit.run(write_yaml(changed), lm=lm, out=out)
    assert len(lm.requests) == 24  # fewshot: 8 examples x 3 options; plain is cached
    assert all(r.context.endswith("\nBest answer: ") for r in lm.requests)
    assert second["plain"] == first["plain"]
    prompts = [json.loads(line)["prompt"] for line in (out / "fewshot" / "predictions.jsonl").read_text().splitlines()]
    assert all("Best answer: " in p for p in prompts)


def test_failed_run_keeps_the_good_results(project, fake_lm):
    out = project / "out"
    taskfit.run(project / "mc.yaml", lm=fake_lm(), out=out)
    good_results = (out / "results.json").read_bytes()
    good_predictions = (out / "zero" / "predictions.jsonl").read_bytes()

    with (project / "mc_small.jsonl").open("a") as f:
        f.write('{"id": "m9", "question": oops}\n')
    lm = fake_lm()
    with pytest.raises(TaskfitError, match="line 9"):
        taskfit.run(project / "mc.yaml", lm=lm, out=out)
    assert lm.calls == []
    assert (out / "results.json").read_bytes() == good_results
    assert (out / "zero" / "predictions.jsonl").read_bytes() == good_predictions


def test_failed_template_keeps_the_good_results(project, fake_lm):
    out = project / "out"
    taskfit.run(project / "mc.yaml", lm=fake_lm(), out=out)
    good_results = (out / "results.json").read_bytes()
    text = (project / "mc.yaml").read_text().replace("{{ question }}", "{{ questoin }}")
    (project / "mc.yaml").write_text(text)
    with pytest.raises(TaskfitError, match="questoin"):
        taskfit.run(project / "mc.yaml", lm=fake_lm(), out=out)
    assert (out / "results.json").read_bytes() == good_results


def test_model_error_mid_run_keeps_the_good_results(project, write_yaml, fake_lm):
    path, out = write_yaml(TWO_RUNS), project / "out"
    taskfit.run(path, lm=fake_lm(), out=out)
    good_results = (out / "results.json").read_bytes()

    class Broken(fake_lm):
        def loglikelihood(self, requests):
            raise RuntimeError("out of memory")

    text = TWO_RUNS.replace("Answer: {{ answer }}", "Answer:  {{ answer }}")
    with pytest.raises(RuntimeError):
        taskfit.run(write_yaml(text), lm=Broken(), out=out)
    assert (out / "results.json").read_bytes() == good_results


def _breaks_on_q(fake_lm):
    """A fake LM that scores other prompts (unlike the first run's) and fails on those starting "Q:"."""

    class Breaks(fake_lm):
        def loglikelihood(self, requests):
            if any(r.context.startswith("Q:") for r in requests):
                raise RuntimeError("out of memory")
            return super().loglikelihood(requests)

    return Breaks(fn=lambda r: -len(r.continuation))


def test_a_run_failing_in_a_later_cell_records_the_cells_it_finished(project, write_yaml, fake_lm):
    """A cell's files are replaced once it has finished: after a failure in the second run, the
    first run's new predictions are on disk, so results.json must give their numbers (it kept the
    old ones), while the second run's old files and numbers stay."""
    path, out = write_yaml(TWO_RUNS), project / "out"
    taskfit.run(path, lm=fake_lm(), out=out)
    old = json.loads((out / "results.json").read_text())
    old_fewshot = (out / "fewshot" / "predictions.jsonl").read_bytes()

    changed = TWO_RUNS.replace("Answer: {{ answer }}", "Best answer: {{ answer }}").replace("A: {{", "Ans: {{")
    with pytest.raises(RuntimeError):
        taskfit.run(write_yaml(changed), lm=_breaks_on_q(fake_lm), out=out)
    recorded = json.loads((out / "results.json").read_text())
    manifest = json.loads((out / "plain" / "manifest.json").read_text())
    assert recorded["plain"] == {**manifest["metrics"], "seed": 0} != old["plain"]
    assert list(recorded) == list(old)  # in their places: the report lists runs in this order
    assert recorded["fewshot"] == old["fewshot"]
    assert (out / "fewshot" / "predictions.jsonl").read_bytes() == old_fewshot


def test_a_spread_whose_members_changed_in_a_failed_run_is_dropped(project, write_yaml, fake_lm):
    text = TWO_RUNS[: TWO_RUNS.index("runs:")] + (
        "runs:\n  t:\n    prompt:\n      combine: each\n      templates:\n"
        '        - "Question: {{ question }}\\nAnswer: {{ answer }}"\n        - "Q: {{ question }}\\nA: {{ answer }}"\n'
    )
    out = project / "out"
    taskfit.run(write_yaml(text), lm=fake_lm(), out=out)
    old = json.loads((out / "results.json").read_text())
    assert "t" in old and len(old) == 3  # two templates and their spread

    changed = text.replace("Answer: {{", "Best answer: {{").replace("A: {{", "Ans: {{")
    with pytest.raises(RuntimeError):
        taskfit.run(write_yaml(changed), lm=_breaks_on_q(fake_lm), out=out)
    recorded = json.loads((out / "results.json").read_text())
    first, second = sorted(k for k in old if k != "t")
    assert recorded[first] != old[first] and recorded[second] == old[second] and "t" not in recorded


def _consistent(out) -> dict:
    """results.json, after checking that each run it names has the numbers of its folders' manifests."""
    from taskfit.evaluation.aggregate import aggregate_seeds

    recorded = json.loads((out / "results.json").read_text())
    for label, result in recorded.items():
        manifests = [json.loads(m.read_text()) for m in out.glob("**/manifest.json")]
        seeds = {m["seed"]: m["metrics"] for m in manifests if m["label"] == label}
        if seeds:
            assert result == json.loads(json.dumps(aggregate_seeds(seeds))), label
    return recorded


def test_a_run_whose_later_seed_fails_is_dropped_not_left_stale(project, write_yaml, fake_lm):
    """Seed 0's folders are replaced before seed 1 runs: a failure in seed 1 leaves that run's
    folders mixed, so results.json must not keep its old numbers (nor claim new ones)."""
    text = TWO_RUNS.replace("shots: 2", "shots: 2\n      demos: random") + "seeds: [0, 1]\n"
    out = project / "out"
    taskfit.run(write_yaml(text), lm=fake_lm(), out=out)
    assert {"plain", "fewshot"} <= set(json.loads((out / "results.json").read_text()))

    class SecondDemoCallFails(fake_lm):  # seed 0's demonstrations score, seed 1's fail
        demo_calls = 0

        def loglikelihood(self, requests):
            if any(r.context.startswith("Q:") for r in requests):
                self.demo_calls += 1
                if self.demo_calls == 2:
                    raise RuntimeError("out of memory")
            return super().loglikelihood(requests)

    lm = SecondDemoCallFails(fn=lambda r: -len(r.continuation))
    changed = text.replace("Answer: {{ answer }}", "Best answer: {{ answer }}").replace("A: {{", "Ans: {{")
    with pytest.raises(RuntimeError):
        taskfit.run(write_yaml(changed), lm=lm, out=out)
    recorded = _consistent(out)
    assert lm.demo_calls == 2 and any((out / "fewshot").glob("*/seed-0/manifest.json"))
    assert "fewshot" not in recorded and "plain" in recorded


def test_an_interrupt_while_metrics_are_computed_drops_the_run_it_replaced(project, write_yaml, fake_lm, monkeypatch):
    from taskfit.evaluation.rows import MetricInputs

    path, out = write_yaml(TWO_RUNS), project / "out"
    taskfit.run(path, lm=fake_lm(), out=out)
    real, seen = MetricInputs.metrics, []

    def interrupted_second(self, seed):
        seen.append(seed)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, seed)

    monkeypatch.setattr(MetricInputs, "metrics", interrupted_second)
    changed = TWO_RUNS.replace("Answer: {{ answer }}", "Best answer: {{ answer }}").replace("A: {{", "Ans: {{")
    with pytest.raises(KeyboardInterrupt):
        taskfit.run(write_yaml(changed), lm=fake_lm(fn=lambda r: -len(r.continuation)), out=out)
    assert (out / "fewshot" / "predictions.jsonl").exists() and not (out / "fewshot" / "manifest.json").exists()
    recorded = _consistent(out)
    assert "plain" in recorded and "fewshot" not in recorded


def test_accuracy_matches_predictions(project, fake_lm, read_jsonl):
    results = taskfit.run(project / "cls.yaml", lm=fake_lm(), out=project / "out")
    rows = read_jsonl(project / "out" / "zero" / "predictions.jsonl")
    assert results["zero"]["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    assert all(
        r["prediction"] == ["negative", "neutral", "positive"][max(range(3), key=r["scores"].__getitem__)] for r in rows
    )
    assert not any(math.isnan(s) for r in rows for s in r["scores"])


def test_predictions_stream_to_disk_and_a_failure_keeps_the_old_file(project, fake_lm, read_jsonl, monkeypatch):
    """Rows go to disk chunk by chunk (a run does not hold them all); predictions.jsonl is
    replaced only when the cell finishes, so a run that dies midway leaves the old one."""
    import taskfit.cell

    out = project / "out"
    taskfit.run(project / "mc.yaml", lm=fake_lm(), out=out)
    good = (out / "zero" / "predictions.jsonl").read_bytes()
    partial = out / "zero" / ".predictions.jsonl.partial"
    monkeypatch.setattr(taskfit.cell, "SCORE_CHUNK_MAX", 2)
    seen = []

    class DiesOnThirdChunk(fake_lm):
        def loglikelihood(self, requests):
            seen.append(len(read_jsonl(partial)) if partial.exists() else None)
            if len(seen) == 3:
                raise RuntimeError("out of memory")
            return super().loglikelihood(requests)

    text = (project / "mc.yaml").read_text().replace("Answer: {{ answer }}", "Answer:  {{ answer }}")
    (project / "mc.yaml").write_text(text)  # new prompts: nothing comes from the cache
    with pytest.raises(RuntimeError):
        taskfit.run(project / "mc.yaml", lm=DiesOnThirdChunk(), out=out)
    assert seen == [0, 2, 4]  # the rows of each finished chunk were on disk before the next one
    assert (out / "zero" / "predictions.jsonl").read_bytes() == good
    assert not partial.exists()


def test_scoring_chunks_close_on_the_examples_text():
    """A scoring strategy's chunk ends before its examples' field text passes the budget or its
    length the maximum; an example over the budget is a chunk of its own."""
    from taskfit.cell import _text_chunks
    from taskfit.data import Example

    examples = [Example(str(i), {"text": "x" * n}, ("a", "b"), 0) for i, n in enumerate([10, 10, 25, 50, 5, 5, 5])]
    chunks = list(_text_chunks(iter(examples), chars=30, most=2))
    assert [[ex.id for ex in c] for c in chunks] == [["0", "1"], ["2"], ["3"], ["4", "5"], ["6"]]


def test_peak_memory_is_counted_per_cell():
    """A cell's peak does not include what an earlier cell of the same process used."""
    from pathlib import Path

    from taskfit.manifest import peak_memory_mb, reset_peak_memory

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("only Linux resets a process's peak memory")
    reset_peak_memory()
    block = b"x" * (300 * 2**20)  # written, so resident
    first = peak_memory_mb()
    del block
    reset_peak_memory()
    second = peak_memory_mb()
    assert first["cpu_rss_scope"] == second["cpu_rss_scope"] == "cell"
    assert first["cpu_rss"] - second["cpu_rss"] > 250


def test_the_api_takes_one_run_name_and_names_wrong_arguments(project, fake_lm, tmp_path):
    results = taskfit.run(project / "cls.yaml", only="zero", out=tmp_path / "out", lm=fake_lm(), limit=2)
    assert list(results) == ["zero"]
    for kwargs, expected in (
        ({"path": None}, "give the path of an experiment YAML file, not NoneType"),
        ({"limit": "5"}, r"limit \(--limit\) must be a whole number, not '5'"),
        ({"limit": 3.7}, "must be a whole number, not 3.7"),
        ({"seed": -1}, r"seed \(--seed\) must be 0 or more"),
    ):
        args = {"path": project / "cls.yaml", **kwargs}
        with pytest.raises(TaskfitError, match=expected):
            taskfit.run(args.pop("path"), out=tmp_path / "x", lm=fake_lm(), **args)


def test_the_resolved_config_a_run_writes_is_a_valid_experiment(project, fake_lm, tmp_path):
    """<out>/config.yaml, with every default filled in, reads back as the same experiment (it
    used to hold `combine` for a single template, which the schema refuses)."""
    from taskfit.config import load_experiment

    taskfit.run(project / "cls.yaml", out=tmp_path / "out", lm=fake_lm(), limit=2)
    written = load_experiment(tmp_path / "out" / "config.yaml").config
    assert written == load_experiment(project / "cls.yaml").config


def test_the_resolved_config_records_a_seed_given_on_the_command_line(project, fake_lm, tmp_path):
    import yaml

    taskfit.run(project / "cls.yaml", out=tmp_path / "out", lm=fake_lm(), limit=2, seed=3)
    written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert written["seed"] == 3 and written["seeds"] is None
