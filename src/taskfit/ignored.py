"""Settings an experiment file sets that its runs never read: each is worth a warning, since a
user who writes `temperature: 0.7` on a run that scores its answers believes it was used.

Only what the file itself sets counts (pydantic's `model_fields_set`), never a default.
"""

from __future__ import annotations

from taskfit.config import ExperimentConfig, FinetuneConfig, PromptConfig

SAMPLING = ("temperature", "top_p", "top_k", "vote", "max_new_tokens", "stop")
REASONING = ("rationale", "trigger", "answer_format")
DEMONSTRATIONS = ("demos", "order", "separator")
ADAPTER = ("r", "alpha", "dropout", "target_modules")


def ignored_settings(config: ExperimentConfig, task_type: str) -> list[str]:
    """One line per setting the file gives that no run of this task reads, with why."""
    notes = []
    if "tracking_uri" in config.model_fields_set and config.tracking != "mlflow":
        notes.append("tracking_uri: not used without `tracking: mlflow`")
    for name, run in config.runs.items():
        if run.prompt is not None:
            notes += _prompt(f"runs.{name}.prompt", run.prompt, task_type)
        if run.finetune is not None:
            notes += _finetune(f"runs.{name}.finetune", run.finetune, task_type)
    if "dev_fraction" in config.task.model_fields_set and config.task.data.dev is not None:
        notes.append("task.dev_fraction: not used: the dev split comes from `task.data.dev`")
    return notes


def _prompt(where: str, prompt: PromptConfig, task_type: str) -> list[str]:
    given = prompt.model_fields_set
    generates = prompt.generates or task_type in ("generation", "token_classification")
    notes = []
    if not generates:
        notes += [
            f"{where}.{key}: not used: this run scores the answer options (a run generates text with "
            "chain_of_thought, samples > 1 or extract)"
            for key in SAMPLING
            if key in given
        ]
    if not prompt.chain_of_thought:
        notes += [f"{where}.{key}: not used without `chain_of_thought: true`" for key in REASONING if key in given]
    if not any(prompt.shot_counts):
        notes += [f"{where}.{key}: not used with `shots: 0`" for key in DEMONSTRATIONS if key in given]
    if task_type in ("generation", "token_classification"):  # no options to score
        notes += [
            f"{where}.{key}: not used on a {task_type} task (it applies to scored answer options)"
            for key in ("normalize", "answer_pooling")
            if key in given
        ]
        if prompt.vote == "mean_prob":
            notes.append(f"{where}.vote: mean_prob averages option probabilities; a {task_type} task votes by majority")
    if generates and prompt.temperature == 0:
        greedy = [key for key in ("top_p", "top_k") if key in given]
        notes += [f"{where}.{key}: not used: greedy decoding (temperature 0)" for key in greedy]
    return notes


def _finetune(where: str, finetune: FinetuneConfig, task_type: str) -> list[str]:
    given = finetune.model_fields_set
    notes = []
    if finetune.method == "full":
        notes += [f"{where}.{key}: not used with `method: full` (a LoRA setting)" for key in ADAPTER if key in given]
    if task_type in ("classification", "token_classification"):  # a head on the input text: no prompt
        notes += [
            f"{where}.{key}: not used: {task_type} fine-tuning trains a head on the input text"
            for key in ("chat", "packing")
            if key in given
        ]
    return notes
