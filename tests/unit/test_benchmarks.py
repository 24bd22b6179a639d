"""The benchmark scripts' own bookkeeping (the tools they time are not run here)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tools_take_turns_round_by_round_and_each_keeps_its_fastest_quiet_run():
    compare = script("compare_lm_eval")
    order = []
    walls = {"peer": [5.0, 3.0, 4.0], "ours": [2.0, 2.5, 1.0]}
    others = {"peer": [0.0, 0.0, 0.0], "ours": [0.0, 0.0, 0.9]}  # our fastest run was a noisy one

    def step(name):
        def run(args):
            assert args.repeat == 1  # one run per round
            k = order.count(name)
            order.append(name)
            return {"wall": walls[name][k], "others": others[name][k], "tries": 1}

        return run

    args = argparse.Namespace(repeat=3, max_other_load=0.25)
    best, per_round = compare.in_rounds(
        args, "zero-shot", {("lm-eval", 1): step("peer"), ("taskfit", "auto"): step("ours")}
    )
    assert order == ["peer", "ours"] * 3
    assert per_round == {("lm-eval", 1): walls["peer"], ("taskfit", "auto"): walls["ours"]}
    assert best["lm-eval", 1]["wall"] == 3.0
    assert best["taskfit", "auto"]["wall"] == 2.0  # not the noisy 1.0
    assert best["lm-eval", 1]["tries"] == best["taskfit", "auto"]["tries"] == 3


def test_the_goals_table_shows_the_speedup_of_every_round(tmp_path):
    summary = script("summary")
    row = {"job": "zero-shot (300 items)", "lm_eval_batch_size": 1, "taskfit_dtype": "auto", "lm_eval_s": 100.0}
    row |= {"taskfit_s": 12.5, "same": 1.0, "max_diff": 0.3, "round_speedups": [9.5, 7.9, 8.4]}
    (tmp_path / "results.json").write_text(json.dumps({"comparisons": [row]}))
    [auto] = [r for r in summary.lm_eval_rows(tmp_path) if r[0] == "zero-shot, dtype auto"]
    assert auto[3].startswith("8.0x (100 s vs 12.5 s; per round 7.9x to 9.5x)")
    assert auto[4] == "yes"
