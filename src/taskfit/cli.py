"""`taskfit run | validate | models`: a thin layer over the Python API."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import ProgressColumn
from rich.table import Table
from rich.text import Text

from taskfit.errors import TaskfitError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Adapt a language model to your task and measure it honestly."
)
out = Console()
err = Console(stderr=True)


def _fail(exc: TaskfitError) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    experiment: Annotated[Path, typer.Argument(help="The experiment YAML file.")],
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Run only this run (repeatable).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N test examples.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default runs/<name>/).")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Override the experiment's seed.")] = None,
) -> None:
    """Run every run of EXPERIMENT (or those given with --only) and print a results table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    import taskfit

    _quiet_libraries()
    try:
        target = out_dir or Path("runs") / taskfit.load_experiment(experiment).config.name
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _ExamplesPerSecond(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as progress:
            results = taskfit.run(experiment, only=only, limit=limit, out=out_dir, seed=seed, progress=progress)
    except TaskfitError as exc:
        _fail(exc)
    from taskfit.store import is_main_process

    if not is_main_process():  # under accelerate launch/torchrun, the main process reports
        return
    out.print(results_table(results))
    out.print(f"Results written to {escape(str(target))}/results.json")


@app.command()
def validate(experiment: Annotated[Path, typer.Argument(help="The experiment YAML file.")]) -> None:
    """Check the experiment file, its data and every prompt, without loading a model."""
    from taskfit.experiment import plan

    _quiet_libraries()
    try:
        p = plan(experiment)
    except TaskfitError as exc:
        _fail(exc)
    sizes = ", ".join(f"{k}: {len(v)}" for k, v in p.task.splits.items())
    out.print(escape(f"{experiment}: OK — {p.task.type}, {sizes}; runs: {', '.join(p.runs)}"))


@app.command()
def compare(
    paths: Annotated[list[Path], typer.Argument(help="An experiment folder, or several run folders.")],
    out_file: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Where to write comparison.json (default: in the experiment folder given; with several "
            "folders, ./comparison.json).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the bootstrap and permutation resamples.")] = 0,
) -> None:
    """Paired comparisons of runs on the same test items: differences, 95% CIs, adjusted p-values."""
    import json

    from taskfit.compare import compare_cells
    from taskfit.rundir import load_cells

    target = out_file or (paths[0] if len(paths) == 1 else Path(".")) / "comparison.json"
    try:
        target = _comparison_target(target)
        comparison = compare_cells(load_cells(paths), seed=seed)
        out.print(comparison_table(comparison))
        _write(target, json.dumps(comparison, indent=2))
    except TaskfitError as exc:
        _fail(exc)
    out.print(f"Written to {escape(str(target))}")


def _comparison_target(path: Path) -> Path:
    """Where comparison.json goes (a link's target), refusing to replace any file that is not a
    comparison: a user's own file, or a run's predictions given as --out by mistake."""
    import json

    path = path.resolve() if path.is_symlink() else path
    if path.is_dir():
        raise TaskfitError(f"--out {path}: a folder; give a file name, e.g. {path / 'comparison.json'}.")
    if path.exists():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            loaded = None
        ours = isinstance(loaded, dict) and "comparisons" in loaded
        if not ours:
            raise TaskfitError(
                f"--out {path}: this file exists and is not a comparison written by taskfit; it was left as it "
                "is. Give another file name."
            )
    return path


def _write(path: Path, text: str) -> None:
    """`atomic_write`, with a failure (read-only folder, no room) as a TaskfitError."""
    from taskfit.store import atomic_write

    try:
        atomic_write(path, text)
    except OSError as exc:
        reason = exc.strerror or exc
        raise TaskfitError(f"{path}: cannot write it ({reason}). Choose a folder you can write to.") from None


def comparison_table(comparison: dict) -> Table:
    table = Table(
        "a vs b",
        "metric",
        "n",
        "a − b [95% CI]",
        "p",
        "p Holm",
        "MDD",
        caption="p: exact McNemar (accuracy) or paired permutation test; p Holm: adjusted over all pairs; "
        "MDD: smallest difference detectable at this test size (power 0.8), * = the difference is below it",
    )
    for r in comparison["comparisons"]:
        low, high = r["ci95"]
        mdd = r.get("mdd")
        small = "*" if mdd is not None and abs(r["difference"]) < mdd else ""
        table.add_row(
            escape(f"{r['a']} vs {r['b']}"),
            r["metric"],
            str(r["n"]),
            f"{r['difference']:+.3f} [{low:+.3f}, {high:+.3f}]",
            f"{r['p_value']:.3g}",
            f"{r['p_adjusted']:.3g}",
            "—" if mdd is None else f"{mdd:.3f}{small}",
        )
    return table


@app.command()
def report(
    experiment_dir: Annotated[Path, typer.Argument(help="An experiment folder written by `taskfit run`.")],
) -> None:
    """Write report.html (self-contained) and report.md with tables and plots for an experiment folder."""
    from taskfit.report import write_report

    try:
        path = write_report(experiment_dir)
    except TaskfitError as exc:
        _fail(exc)
    out.print(escape(f"Report written to {path} and {path.with_name('report.md')}"))


@app.command()
def models() -> None:
    """List model aliases and whether their converted weights are cached."""
    from taskfit.models.registry import cached_models

    table = Table("alias", "description", "cached weights")
    for column in table.columns:
        column.overflow = "fold"
    for row in cached_models():
        table.add_row(row["alias"], row["description"], row["cached"])
    out.print(table)
    out.print("model.name also takes a local transformers folder, a .gguf file, or a hub id (offline: only if cached).")


class _ExamplesPerSecond(ProgressColumn):
    """A progress column: examples per second of the cell being scored."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} ex/s" if task.speed else "… ex/s", style="progress.data.speed")


def results_table(results: dict) -> Table:
    """Metric [95% CI] for one seed; mean ± std across seeds, or across a run's variants
    (templates, demonstration sets) on its own line."""
    metrics = [k[: -len("_ci95")] for r in results.values() for k in r if k.endswith("_ci95")]
    metrics += [k[: -len("_std")] for r in results.values() for k in r if k.endswith("_std")]
    metrics = list(dict.fromkeys(metrics))
    table = Table("run", "n", *metrics)
    for name, r in results.items():  # a variant's label, "run[t0]", is not markup
        table.add_row(escape(name), str(r.get("n", "")), *[_cell(r, m) for m in metrics])
    return table


def _cell(r: dict, m: str) -> str:
    if f"{m}_std" in r:
        over = f"{len(r['seeds'])} seeds" if "seeds" in r else f"{len(r['variants'])} variants"
        return f"{r[m]:.3f} ± {r[m + '_std']:.3f} ({over})"
    if f"{m}_ci95" in r:
        low, high = r[f"{m}_ci95"]
        return f"{r[m]:.3f} [{low:.3f}, {high:.3f}]"
    return ""


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Read by transformers when it is imported: importing it here would cost ~0.5 s of every run,
    # and a run that only scores a Llama checkpoint never imports it (see models.llama).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if "transformers" in sys.modules:  # imported already (the CLI called in-process): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main() -> None:
    try:
        app()
        code = 0
    except KeyboardInterrupt:
        err.print("interrupted; finished examples are cached and the same command resumes.")
        code = 130
    except SystemExit as exc:  # how typer ends every command
        code = exc.code
    _leave(code)


def _leave(code: int | str | None) -> None:
    """End the process with `code` (as `sys.exit` would take it) once the atexit handlers have run
    and the standard streams are flushed, without the interpreter's teardown. Everything is
    written and closed by now; the teardown would free every object torch and transformers made
    one by one (~0.35 s after the default model has loaded, and its last garbage collection
    another ~0.9 s) only to free memory that the exiting process gives back anyway."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    gc.freeze()  # what runs below must not set off a collection of everything either
    for thread in threading.enumerate():  # as the interpreter does: its threads finish first
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
