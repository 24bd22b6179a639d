"""taskfit: adapt a language model to your task, by prompting or fine-tuning, and measure
the result honestly."""

from taskfit.config import Experiment, load_experiment
from taskfit.errors import TaskfitError
from taskfit.experiment import run
from taskfit.models import load_model
from taskfit.tasks import load_task as _load_task

__all__ = ["Experiment", "TaskfitError", "load_experiment", "load_model", "load_task", "run"]
__version__ = "0.1.0"


def load_task(experiment):
    """The task of an experiment (a path or a loaded `Experiment`), with all splits read and checked."""
    if not isinstance(experiment, Experiment):
        experiment = load_experiment(experiment)
    return _load_task(experiment)
