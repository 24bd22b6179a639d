"""Prompts: templates with an answer slot, verbalizers, demonstrations, and the strategies
that turn them into predictions (scoring, ensembles, calibration, chain of thought, voting)."""

from __future__ import annotations

from taskfit.config import PromptConfig
from taskfit.errors import TaskfitError
from taskfit.prompting.template import Template
from taskfit.tasks import Task

__all__ = ["Template", "build_strategy"]


def build_strategy(cfg: PromptConfig, task: Task, seed: int, where: str, chat=None, templates: list[str] | None = None):
    """The strategy of a prompt run: scoring (one template or an ensemble), generating, or
    (token classification) generating entity lines."""
    from taskfit.prompting.generative import GenerateStrategy
    from taskfit.prompting.strategy import ScoreStrategy

    templates = templates or cfg.template_list
    if task.type == "token_classification":
        from taskfit.prompting.entities import build_entity_strategy

        return build_entity_strategy(cfg, task, seed, where, templates, chat)
    if cfg.calibrate != "none" and (cfg.generates or task.type == "generation"):
        what = "a generation task" if task.type == "generation" else "a generating run (chain of thought or sampling)"
        raise TaskfitError(f"{where}.calibrate: contextual calibration rescales option scores; {what} has none.")
    if cfg.generates or task.type == "generation":
        if len(templates) > 1 and cfg.combine in ("mean_prob", "vote"):
            raise TaskfitError(
                f"{where}.combine: `{cfg.combine}` ensembles scored templates; for generating runs use "
                "`combine: each` or `select_on_dev`."
            )
        return GenerateStrategy(cfg, task, seed, where, templates[0], chat)
    return ScoreStrategy(cfg, task, seed, where, templates, chat)
