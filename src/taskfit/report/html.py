"""report.html: one self-contained file (inline CSS, plots as base64 data URIs), so it opens
from disk, by e-mail or as a CI artifact without a server."""

from __future__ import annotations

import base64
from importlib import resources

import jinja2

from taskfit.report.blocks import Section

TEMPLATE = "templates/report.html.j2"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _environment() -> jinja2.Environment:
    # autoescape: run names, class names and prompts come from user data and end up in HTML.
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["data_uri"] = data_uri
    env.globals["kind"] = lambda block: type(block).__name__.lower()
    return env


def render_html(title: str, sections: list[Section]) -> str:
    source = resources.files("taskfit.report").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return _environment().from_string(source).render(title=title, sections=sections)
