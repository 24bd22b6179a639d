"""Prompts: templates with an answer slot, verbalizers, demonstrations, scoring strategy."""

from taskfit.prompting.template import Template

__all__ = ["Template"]
