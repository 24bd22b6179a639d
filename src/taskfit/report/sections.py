"""The report's sections, in order. Each builder returns a Section, or None when the
experiment has no data for it (a single cell, no scores, no seeds to compare, ...)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from taskfit.report import analysis, plots
from taskfit.report.blocks import Example, Facts, Figure, Section, Subheading, Table, Text
from taskfit.report.costs import cost_section
from taskfit.report.data import ReportData
from taskfit.report.formatting import DASH, interval, metric_cell, metric_names, num, p_value, slug

Builder = Callable[[ReportData, str], "Section | None"]


def build_sections(data: ReportData) -> list[Section]:
    metric = main_metric(data)
    builders: list[Builder] = [
        header_section,
        results_section,
        chart_section,
        comparison_section,
        per_class_section,
        calibration_section,
        learning_section,
        cost_section,
        seed_section,
        spread_section,
        errors_section,
    ]
    return [s for s in (build(data, metric) for build in builders) if s is not None]


def main_metric(data: ReportData) -> str:
    names = metric_names([g.result for g in data.groups])
    return names[0] if names else "accuracy"


def _human(metric: str) -> str:
    return metric.replace("_", " ").capitalize()


def _unique(values) -> str:
    kept = [str(v) for v in dict.fromkeys(values) if v not in (None, "")]
    return ", ".join(kept) or DASH


def header_section(data: ReportData, metric: str) -> Section:
    manifests = [c.manifest for c in data.cells]
    models = [m.get("model") or {} for m in manifests]
    versions = [m.get("versions") or {} for m in manifests]
    seeds = sorted({c.seed for c in data.cells})
    classes = f" ({', '.join(data.class_names)})" if data.class_names else ""
    facts = [
        ("experiment", data.name),
        ("folder", str(data.folder.resolve())),
        ("task", f"{data.task_type or DASH}{classes}"),
        ("model", _unique(f"{m.get('name', '?')} ({m.get('dtype', '?')}, {m.get('device', '?')})" for m in models)),
        ("test examples", _unique(m.get("examples") or m.get("metrics", {}).get("n") for m in manifests)),
        ("runs", f"{len(data.groups)} run(s), {len(data.cells)} cell(s); seeds: {', '.join(map(str, seeds))}"),
        ("run finished", data.finished.strftime("%Y-%m-%d %H:%M %Z") if data.finished else DASH),
        ("report written", datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
    ]
    for package in ("taskfit", "torch", "transformers"):
        facts.append((package, _unique(v.get(package) for v in versions)))
    facts.append(("git commit", _unique(m.get("git_commit") for m in manifests)))
    missing = missing_note(data)
    return Section("overview", "Overview", [Facts(facts)] + ([Text(missing)] if missing else []))


LABEL = re.compile(r"([A-Za-z0-9_.-]+)(?:\[([^\]]+)\])?(?:@(.+))?")
"""A results.json label: run, [variant tag], @model slug: the parts of its folder's path."""


def missing_note(data: ReportData) -> str:
    """Which runs results.json lists but no finished cell is left for (a folder deleted or
    moved): their rows come from results.json alone, and they are absent from everything else."""
    notes = []
    for group in data.groups:
        if group.cells or group.result.get("variants"):  # a spread row has no cells of its own
            continue
        path = _label_folder(data.folder, group.label)
        state = "holds no finished cell" if path.is_dir() else "is missing"
        notes.append(f"results.json lists {group.label}, but its folder {path} {state}.")
    if not notes:
        return ""
    its, it = ("Its", "it has") if len(notes) == 1 else ("Their", "they have")
    return " ".join(notes) + (
        f" {its} numbers in the results table are those results.json kept; {it} no plots, per-class numbers "
        "or comparisons. Restore the folder, or run `taskfit run` again to write it."
    )


def _label_folder(folder: Path, label: str) -> Path:
    match = LABEL.fullmatch(label)
    parts = [p for p in match.groups() if p] if match else [label]
    return folder.joinpath(*parts)


def results_section(data: ReportData, metric: str) -> Section:
    metrics = metric_names([g.result for g in data.groups])
    rows = [
        [g.label, str(g.result.get("n", DASH)), ", ".join(map(str, g.seeds)) or DASH]
        + [metric_cell(g.result, m) for m in metrics]
        for g in data.groups
    ]
    table = Table(
        ["run", "n", "seeds", *metrics], rows, name="results", numeric=[False, True, False] + [True] * len(metrics)
    )
    note = (
        "One seed: the value and its 95% bootstrap interval over test examples. "
        "Several seeds: mean ± standard deviation across seeds, with the range."
    )
    return Section("results", "Results", [Text(note), table])


def chart_section(data: ReportData, metric: str) -> Section | None:
    points = [(g.label, analysis.metric_error(g.result, metric)) for g in data.groups]
    points = [(label, p) for label, p in points if p is not None]
    if not points:
        return None
    png = plots.metric_bars([lab for lab, _ in points], [p[0] for _, p in points], [p[1:3] for _, p in points], metric)
    kinds = {p[3] for _, p in points}
    bars = {"ci": "95% bootstrap intervals", "std": "standard deviations across seeds"}
    caption = f"Error bars: {' and '.join(bars[k] for k in sorted(kinds) if k in bars) or 'none'}."
    title = f"{_human(metric)} by run"
    return Section("chart", title, [Figure(f"{slug(metric)}-by-run", title, png, caption)])


COMPARISON_COLUMNS = [
    "metric",
    "A",
    "B",
    "seed",
    "n",
    "A value",
    "B value",
    "difference A − B",
    "95% CI",
    "p",
    "adjusted p",
    "MDD",
    "note",
]
COMPARISON_INTRO = (
    "Paired tests on the same test items ({tests}); difference = A − B with a paired bootstrap 95% interval; "
    "adjusted p: Holm–Bonferroni over all pairs of a metric. MDD: the minimum detectable difference "
    "(power 0.8, α = 0.05) at this test size; a smaller difference means the test set is too small to tell."
)


def comparison_section(data: ReportData, metric: str) -> Section | None:
    title = "Pairwise comparisons"
    missing = [Text(note)] if (note := missing_note(data)) else []
    if not data.comparisons:
        blocks = [Text(data.comparison_note), *missing]
        return Section("comparisons", title, blocks) if len(data.groups) > 1 else None
    rows = [_comparison_row(c) for c in data.comparisons]
    flags = [_verdict(c)[1] for c in data.comparisons]
    numeric = [False, False, False, True] + [True] * 8 + [False]
    table = Table(COMPARISON_COLUMNS, rows, "comparisons", flags, numeric)
    intro = COMPARISON_INTRO.format(tests=_unique(c.get("test") for c in data.comparisons))
    return Section("comparisons", title, [Text(intro), table, *missing])


def _comparison_row(c: dict) -> list[str]:
    names = [str(c.get(k, DASH)) for k in ("metric", "a", "b", "seed", "n")]
    values = [num(c.get(k)) for k in ("a_value", "b_value", "difference")]
    tests = [interval(c.get("ci95")), p_value(c.get("p_value")), p_value(c.get("p_adjusted")), num(c.get("mdd"))]
    return names + values + tests + [_verdict(c)[0]]


def _verdict(c: dict) -> tuple[str, bool]:
    diff, mdd, p = c.get("difference"), c.get("mdd"), c.get("p_adjusted", c.get("p_value"))
    if isinstance(diff, int | float) and isinstance(mdd, int | float) and abs(diff) < mdd:
        return "test set too small to tell", True
    if isinstance(p, int | float) and p < 0.05:
        return "significant (adjusted p < 0.05)", False
    return "", False


def per_class_section(data: ReportData, metric: str) -> Section | None:
    if data.task_type != "classification" or not data.class_names:
        return None
    blocks: list = [Text("Per class, from the lowest seed of each run. Rows of the heatmap: gold; columns: predicted.")]
    for i, group in enumerate(data.groups):
        if group.first is None:
            continue
        gold, pred = analysis.gold_and_pred(group.first.predictions, data.class_names)
        matrix = analysis.confusion_matrix(gold, pred, len(data.class_names))
        title = f"{group.label} (seed {group.first.seed})"
        blocks += [Subheading(title), _per_class_table(matrix, data.class_names, f"per-class-{slug(group.label)}")]
        png = plots.confusion_heatmap(matrix, data.class_names, title)
        blocks.append(Figure(f"confusion-{i + 1:02d}-{slug(group.label)}", f"Confusion matrix: {title}", png))
    return Section("per-class", "Per class", blocks) if len(blocks) > 1 else None


def _per_class_table(matrix, class_names: list[str], name: str) -> Table:
    stats = analysis.per_class(matrix)
    rows = [
        [c, num(s["precision"]), num(s["recall"]), num(s["f1"]), str(s["support"])] for c, s in zip(class_names, stats)
    ]
    macro = [sum(s[k] for s in stats) / len(stats) for k in ("precision", "recall", "f1")]
    rows.append(["macro average", *map(num, macro), str(int(matrix.sum()))])
    return Table(["class", "precision", "recall", "F1", "support"], rows, name, numeric=[False] + [True] * 4)


def calibration_section(data: ReportData, metric: str) -> Section | None:
    panels, rows = [], []
    for group in data.groups:
        if group.first is None:
            continue
        cal = analysis.calibration(group.first.predictions, data.class_names)
        if cal is None:
            continue
        panels.append((group.label, cal))
        total = sum(b["count"] for b in cal["bins"])
        conf = sum(b["confidence"] * b["count"] for b in cal["bins"] if b["count"]) / total
        acc = sum(b["accuracy"] * b["count"] for b in cal["bins"] if b["count"]) / total
        rows.append([group.label, str(group.first.seed), str(cal["n"]), num(conf), num(acc), num(cal["ece"])])
    if not panels:
        return None
    intro = (
        "Confidence: the model's probability for the option it predicted (softmax of the options' "
        "log-likelihoods), lowest seed of each run. ECE: expected calibration error over 10 equal-width bins."
    )
    table = Table(
        ["run", "seed", "n", "mean confidence", "accuracy", "ECE"], rows, "calibration", numeric=[False] + [True] * 5
    )
    figure = Figure("reliability", "Reliability diagrams", plots.reliability_grid(panels))
    return Section("calibration", "Calibration", [Text(intro), table, figure])


def learning_section(data: ReportData, metric: str) -> Section | None:
    series = analysis.learning_series(data.groups, metric)
    if not series:
        return None
    x_name = {"shots": "demonstrations", "train_size": "training examples"}
    rows = [[s.name, x_name[s.kind], f"{x:g}", num(v)] for s in series for x, v, _, _ in s.points]
    table = Table(["runs", "x", "value of x", metric], rows, "learning-curve", numeric=[False, False, True, True])
    caption = "Runs that differ only in the number of demonstrations (or training examples) share a line."
    figure = Figure("learning-curve", f"{metric} vs amount of task data", plots.learning_curve(series, metric), caption)
    return Section("learning-curve", "Learning curve", [figure, table])


def seed_section(data: ReportData, metric: str) -> Section | None:
    values = [(g.label, analysis.per_seed_values(g, metric)) for g in data.groups]
    values = [(label, v) for label, v in values if v]
    if not any(len(v) >= 2 for _, v in values):
        return None
    png = plots.seed_boxes([lab for lab, _ in values], [v for _, v in values], metric)
    caption = "Each dot is one seed (demonstration draw and bootstrap seed); boxes show the quartiles."
    return Section(
        "sensitivity", "Sensitivity to the seed", [Figure("seed-spread", f"{metric} across seeds", png, caption)]
    )


def spread_section(data: ReportData, metric: str) -> Section | None:
    """Runs with several templates or demonstration sets: the spread a single number hides,
    and how much of it each source of randomness explains (with several seeds)."""
    spreads = [g for g in data.groups if g.result.get("variants")]
    if not spreads:
        return None
    rows = []
    for g in spreads:
        r = g.result
        shares = r.get("variance_shares", {}).get(metric, {})
        share = ", ".join(f"{k} {v:.0%}" for k, v in shares.items()) or DASH
        rows.append(
            [
                g.label,
                str(len(r["variants"])),
                num(r.get(metric)),
                num(r.get(f"{metric}_std")),
                f"{num(r.get(f'{metric}_min'))}–{num(r.get(f'{metric}_max'))}",
                share,
            ]
        )
    columns = ["run", "variants", f"mean {metric}", "std", "min–max", "share of variance"]
    intro = Text(
        "Each variant is one template (`combine: each`) or one draw of demonstrations (`demo_sets`). "
        "The share of variance splits the spread between variants and seeds (main effects; the rest is residual)."
    )
    table = Table(columns, rows, "spread", numeric=[False, True, True, True, False, False])
    return Section("spread", "Spread across templates and demonstrations", [intro, table])


def errors_section(data: ReportData, metric: str) -> Section | None:
    blocks: list = []
    for group in data.groups:
        cell = group.first
        if cell is None or not any("correct" in r for r in cell.predictions):
            continue
        n_wrong = sum(1 for r in cell.predictions if r.get("correct") is False)
        blocks.append(Subheading(f"{group.label} (seed {cell.seed}): {n_wrong} of {len(cell.predictions)} wrong"))
        wrong = analysis.wrong_predictions(cell.predictions)
        blocks += [_example(row, data) for row in wrong] or [Text("No wrong predictions.")]
    if not blocks:
        return None
    intro = Text("The first wrong predictions in id order (up to 5 per run), with the prompt the model scored.")
    return Section("errors", "Wrong predictions", [intro, *blocks])


def _example(row: dict, data: ReportData) -> Example:
    mc = data.task_type == "multiple_choice"
    fields = [
        ("gold option (0-based)" if mc else "gold", str(row.get("label", DASH))),
        ("predicted option (0-based)" if mc else "prediction", str(row.get("prediction", DASH))),
    ]
    confidence = analysis.prediction_confidence(row, data.class_names)
    if confidence is not None:
        fields.append(("p(prediction)", num(confidence)))
    prompt = analysis.truncate_prompt(str(row.get("prompt") or "(no prompt recorded)"))
    generations = row.get("generations") or []
    output = analysis.truncate_prompt(str(generations[0])) if generations else ""
    return Example(f"id {row.get('id', DASH)}", fields, prompt, output)
