"""`taskfit report`: a static HTML page (and the same in Markdown) for an experiment folder:
results with their uncertainty, paired comparisons, per-class numbers, calibration, learning
curve, cost, seed sensitivity and a sample of wrong predictions."""

from __future__ import annotations

from pathlib import Path

from taskfit.errors import TaskfitError


def write_report(experiment_dir: Path) -> Path:
    """Write `report.html`, `report.md` and `report_files/*.png` into an experiment folder
    written by `taskfit run`, all three or none; return the path of report.html."""
    try:
        import matplotlib  # noqa: F401  (plots use its Agg canvas directly; no backend switch)
    except ImportError as exc:
        raise TaskfitError("`taskfit report` draws its plots with matplotlib: pip install matplotlib") from exc
    from taskfit.report.data import gather
    from taskfit.report.html import render_html
    from taskfit.report.markdown import render_markdown
    from taskfit.report.output import HTML, write_report_files
    from taskfit.report.sections import build_sections

    folder = Path(experiment_dir)
    data = gather(folder)
    sections = build_sections(data)
    title = f"taskfit report: {data.name}"
    write_report_files(folder, render_html(title, sections), render_markdown(title, sections), sections)
    return folder / HTML


__all__ = ["write_report"]
