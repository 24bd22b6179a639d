"""Task types: how a row becomes an `Example` with options and a gold answer, and which
metrics apply."""

from taskfit.tasks.base import Task, load_task

__all__ = ["Task", "load_task"]
