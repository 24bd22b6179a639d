"""Shared fixtures for the unit tests: a scripted fake LM and a project folder with data.

The fake LM follows dspy's `DummyLM` idea: prompting logic is tested against a model whose
every answer is known in advance, so a test can compute the expected prediction by hand.
"""

from __future__ import annotations

import csv
import json
import shutil
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from taskfit.models.base import Request

ASSETS = Path(__file__).resolve().parents[1] / "assets"

MC_TRAIN = [
    {
        "id": "t1",
        "question": "Lee found a wallet on the street. What will Lee do?",
        "choices": ["return it", "eat it", "paint it"],
        "answer": 0,
    },
    {
        "id": "t2",
        "question": "Mia studied all night. How will Mia feel in the morning?",
        "choices": ["rested", "tired", "invisible"],
        "answer": 1,
    },
    {
        "id": "t3",
        "question": "Omar's plant was wilting. What should Omar do?",
        "choices": ["sing to it", "sell it", "water it"],
        "answer": 2,
    },
    {
        "id": "t4",
        "question": "Zoe got a puppy for her birthday. How would Zoe feel?",
        "choices": ["happy", "bored", "scared"],
        "answer": 0,
    },
    {
        "id": "t5",
        "question": "Ben missed the bus. What will Ben do next?",
        "choices": ["fly home", "wait for the next one", "give up school"],
        "answer": 1,
    },
    {
        "id": "t6",
        "question": "Ava spilled juice on the floor. What should Ava do?",
        "choices": ["leave it", "hide", "wipe it up"],
        "answer": 2,
    },
]

CLS_TRAIN = [
    ("r1", "Absolutely wonderful stay, friendly staff.", "positive"),
    ("r2", "The package arrived broken and late.", "negative"),
    ("r3", "The store opens at nine on weekdays.", "neutral"),
    ("r4", "Best pizza I have had in years.", "positive"),
    ("r5", "Terrible battery life, dies by noon.", "negative"),
    ("r6", "The manual is printed in three languages.", "neutral"),
    ("r7", "I would happily buy this again.", "positive"),
    ("r8", "Customer support never answered my emails.", "negative"),
    ("r9", "The box contains two spare screws.", "neutral"),
]

MC_YAML = """\
name: mc
task:
  type: multiple_choice
  data:
    train: mc_train.jsonl
    test: mc_small.jsonl
  choices: choices
  label: answer
runs:
  zero:
    prompt:
      template: "Question: {{ question }}\\nAnswer: {{ answer }}"
"""

CLS_YAML = """\
name: cls
task:
  type: classification
  data:
    train: cls_train.csv
    test: cls_small.csv
runs:
  zero:
    prompt:
      template: "Review: {{ text }}\\nSentiment: {{ answer }}"
"""


def hash_score(req: Request) -> float:
    """A deterministic log-likelihood in [-11, -1) that depends on the whole request text."""
    h = zlib.crc32(f"{req.context}\x00{req.continuation}".encode())
    return -1.0 - (h % 1000) / 100.0


class FakeLM:
    """Scores continuations from a table (or a function), falling back on `hash_score`.

    Records every request it is asked to score, so tests can count model calls.
    """

    def __init__(
        self,
        scores: dict[str, float] | None = None,
        fn: Callable[[Request], float] | None = None,
        name: str = "fake-lm",
    ):
        self.identity: dict[str, Any] = {"name": name, "dtype": "float32", "device": "cpu"}
        self.scores = dict(scores or {})
        self.fn = fn
        self.calls: list[list[Request]] = []
        self.chats: list[str] = []

    def score(self, req: Request) -> float:
        if self.fn is not None:
            return float(self.fn(req))
        if req.continuation in self.scores:
            return float(self.scores[req.continuation])
        return hash_score(req)

    def loglikelihood(self, requests: list[Request]) -> list[float]:
        requests = list(requests)
        self.calls.append(requests)
        return [self.score(r) for r in requests]

    def chat(self, user_message: str) -> str:
        self.chats.append(user_message)
        return f"<user>{user_message}</user><assistant>"

    @property
    def requests(self) -> list[Request]:
        return [r for call in self.calls for r in call]


@pytest.fixture
def fake_lm() -> type[FakeLM]:
    """The FakeLM class (a fixture, so test modules need not import conftest)."""
    return FakeLM


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with the test assets, a train split for each task, and `mc.yaml` / `cls.yaml`."""
    for name in ("mc_small.jsonl", "cls_small.csv"):
        shutil.copy(ASSETS / name, tmp_path / name)
    (tmp_path / "mc_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_TRAIN), encoding="utf-8")
    with (tmp_path / "cls_train.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "label"])
        writer.writerows(CLS_TRAIN)
    (tmp_path / "mc.yaml").write_text(MC_YAML, encoding="utf-8")
    (tmp_path / "cls.yaml").write_text(CLS_YAML, encoding="utf-8")
    return tmp_path


@pytest.fixture
def write_yaml(project: Path) -> Callable[..., Path]:
    """Write an experiment file (dedented) into the project folder and return its path."""

    def write(text: str, name: str = "exp.yaml") -> Path:
        path = project / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def read_jsonl() -> Callable[[Path], list[dict]]:
    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    return read


@pytest.fixture
def mc_train() -> list[dict]:
    return [dict(r) for r in MC_TRAIN]


@pytest.fixture
def cls_train() -> list[tuple[str, str, str]]:
    return list(CLS_TRAIN)
