"""Writing a report as one piece: report.html, report.md and the plot folder are built under a
hidden staging folder in the experiment folder, then renamed into place together. A failure at
any step leaves the previous report, its plots and anything else there as they were."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from taskfit.errors import TaskfitError
from taskfit.report.blocks import Section
from taskfit.report.markdown import FILES

HTML, MARKDOWN = "report.html", "report.md"
NAMES = (FILES, MARKDOWN, HTML)
"""Swapped in this order; a failure undoes the ones already swapped."""
AGAIN = "then run `taskfit report` again"


def write_report_files(folder: Path, html: str, markdown: str, sections: list[Section]) -> None:
    """Put report.html, report.md and `report_files/<figure>.png` into `folder`, all or none."""
    _check_targets(folder)
    try:
        stage = Path(tempfile.mkdtemp(prefix=".report-", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise _write_error(folder, exc) from None
    try:
        _fill(stage, folder, html, markdown, sections)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _write_error(folder, exc) from None
        raise
    _swap(stage, folder)


def _check_targets(folder: Path) -> None:
    """Refuse before writing anything when a report path holds something a report cannot replace."""
    for name in NAMES:
        path = folder / name
        if name == FILES and path.is_symlink():
            raise TaskfitError(
                f"{path}: a link where the report's plot folder goes (the report replaces that folder "
                f"as a whole). Replace the link by a plain folder, or move it away, {AGAIN}."
            )
        if name == FILES and path.exists() and not path.is_dir():
            raise TaskfitError(f"{path}: a file where the report's plot folder goes. Move or rename the file, {AGAIN}.")
        if name != FILES and path.is_dir():
            raise TaskfitError(f"{path}: a folder where the report file goes. Move or rename the folder, {AGAIN}.")


def _fill(stage: Path, folder: Path, html: str, markdown: str, sections: list[Section]) -> None:
    (stage / HTML).write_text(html, encoding="utf-8")
    (stage / MARKDOWN).write_text(markdown, encoding="utf-8")
    plots = stage / FILES
    plots.mkdir()
    for section in sections:
        for figure in section.figures():
            (plots / f"{figure.name}.png").write_bytes(figure.png)
    _keep_other_files(folder / FILES, plots)


def _keep_other_files(old: Path, new: Path) -> None:
    """The report owns the PNGs of its plot folder; anything else a user put there moves along."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name.endswith(".png") and not entry.is_dir():
            continue  # an old plot: the new report's PNGs replace them (stale ones go)
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def _swap(stage: Path, folder: Path) -> None:
    """Rename the staged files into place, the old ones into `stage/old`; on failure, put back
    what was moved. The old ones are deleted only once every new one is in place."""
    old = stage / "old"
    moved: list[str] = []  # old versions now in `old`
    placed: list[str] = []  # new versions now in `folder`
    target = folder
    try:
        old.mkdir()
        for name in NAMES:
            target = folder / name
            if target.exists() or target.is_symlink():
                os.replace(target, old / name)
                moved.append(name)
            os.replace(stage / name, target)
            placed.append(name)
    except OSError as exc:
        if not _undo(stage, folder, moved, placed):
            raise TaskfitError(
                f"{folder}: could not write the report ({exc.strerror or exc}), nor put the previous one "
                f"back: its files are in {old}. Move them back into {folder}, {AGAIN}."
            ) from None
        shutil.rmtree(stage, ignore_errors=True)
        raise _write_error(target, exc) from None
    shutil.rmtree(stage, ignore_errors=True)


def _undo(stage: Path, folder: Path, moved: list[str], placed: list[str]) -> bool:
    """Take the new files back out and the old ones back in; False if that failed too."""
    try:
        for name in reversed(NAMES):
            if name in placed:
                os.replace(folder / name, stage / name)
            if name in moved:
                os.replace(stage / "old" / name, folder / name)
    except OSError:
        return False
    return True


def _write_error(path: Path, exc: OSError) -> TaskfitError:
    reason = exc.strerror or str(exc)
    return TaskfitError(
        f"{path}: could not write the report ({reason}); the previous report is unchanged. "
        f"Check that the folder is writable and the disk has space, {AGAIN}."
    )
