"""report.html opened from disk in a real (headless) browser: every plot loads, the tables are
there, and the page asks for nothing beyond itself."""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import pytest

import taskfit
from taskfit.models.base import Request
from taskfit.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
ASSETS = Path(__file__).resolve().parents[1] / "assets"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

EXPERIMENT = """\
name: browser
task:
  type: classification
  data: {train: train.csv, test: cls_small.csv}
seeds: [0, 1]
runs:
  zero:
    prompt:
      template: "Review: {{ text }}\\nSentiment: {{ answer }}"
  two-shot:
    prompt:
      template: "Review: {{ text }}\\nSentiment: {{ answer }}"
      shots: 2
      demos: random
"""
TRAIN = """\
id,text,label
r1,"Absolutely wonderful stay, friendly staff.",positive
r2,The package arrived broken and late.,negative
r3,The store opens at nine on weekdays.,neutral
r4,Terrible battery life <b>dies</b> by noon.,negative
"""


class HashLM:
    """A deterministic stand-in model: each log-likelihood is a hash of the request."""

    identity = {"name": "hash-lm", "dtype": "float32", "device": "cpu"}

    def loglikelihood(self, requests: list[Request]) -> list[float]:
        return [-1.0 - zlib.crc32(f"{r.context}\x00{r.continuation}".encode()) % 1000 / 100 for r in requests]

    def chat(self, user_message: str) -> str:
        return user_message


@pytest.fixture
def report(tmp_path: Path) -> Path:
    shutil.copy(ASSETS / "cls_small.csv", tmp_path / "cls_small.csv")
    (tmp_path / "train.csv").write_text(TRAIN, encoding="utf-8")
    (tmp_path / "exp.yaml").write_text(EXPERIMENT, encoding="utf-8")
    out = tmp_path / "out"
    taskfit.run(tmp_path / "exp.yaml", lm=HashLM(), out=out)
    return write_report(out)


def test_report_renders_in_chromium(report: Path):
    if not CHROMIUM.exists() and not os.environ.get("CI"):
        pytest.skip(f"{CHROMIUM} not found (install Debian's chromium to run this test; it always runs when CI is set)")
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(report.as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.alt])")
            result_rows = page.locator("#table-results tbody tr").count()
            comparison_rows = page.locator("#table-comparisons tbody tr").count()
            results_visible = page.locator("#table-results").is_visible()
        finally:
            browser.close()
    assert len(images) == 7, images  # bars, 2 confusion matrices, reliability, learning curve, cost, seeds
    assert all(complete and width > 0 for complete, width, _ in images), images
    assert results_visible and result_rows == 2
    assert comparison_rows > 0
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert not errors, errors
