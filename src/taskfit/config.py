"""The schema of the experiment file.

Strict: an unknown key is an error that names the key, its line and the closest valid
key. Paths in `task.data` are relative to the experiment file. YAML is loaded with
`yaml.SafeLoader` only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from taskfit.config_errors import explain, key_lines
from taskfit.errors import TaskfitError

DEFAULT_MODEL = "smollm2-135m-instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = DEFAULT_MODEL
    """Registry alias, local transformers folder, GGUF file, or hub id (cached or reachable)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """`auto`: bfloat16 where the device computes it natively (recent CPUs, GPUs), else float32."""
    device: str = "auto"
    """`auto`: a GPU when one is present, else the CPU; or `cpu`, `cuda`, `cuda:1`, ..., `mps`."""
    batch_tokens: int = Field(4096, gt=0)
    """Upper bound on tokens per forward batch when scoring; does not change any score."""
    recheck_margin: float = Field(0.2, ge=0)
    """Under bf16 autocast (float32 weights): an example whose two best answers score within this
    many nats of each other (answer strings by the model; labels after pooling, normalization and
    calibration by the scoring strategy) is scored again in float32, so that bf16 rounding seldom
    flips a near-tie (0: never). On the benchmark, bf16 moved the gap between two answers by 0.05 nats
    (median) to 0.27 (99th percentile); 0.2 rechecked ~6% of the examples."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        # torch would reject a misspelt device only once the run starts
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"'{value}' is not a device; use auto, cpu, cuda, cuda:N (N: the GPU's index) or mps")
        return value


class DataConfig(_Strict):
    train: str | None = None
    dev: str | None = None
    test: str
    """Each a .jsonl .json .csv .tsv or .parquet file, relative to the experiment file."""


class TaskConfig(_Strict):
    type: Literal["classification", "multiple_choice", "generation", "token_classification"]
    data: DataConfig
    label: str = "label"
    """Field with the gold answer: a label name (classification); an index into the choices
    or the option's text (multiple choice); the target text, or a list of acceptable ones (generation)."""
    labels: list[str] | None = None
    """Classification label space, in this order; default: sorted labels of the train split."""
    choices: str | list[str] | None = None
    """Multiple choice: the field holding the list of options, or a list of fields, one per option."""
    id: str = "id"
    """Field with a unique example id; when absent from the data, ids are `<split>-<line>`."""
    input: list[str] | None = None
    """Fine-tuning: the fields the model reads (one, or two as a text pair); default: all text
    fields but the label and id."""
    tokens: str | None = None
    """Token classification: the field with the list of tokens (the label field has one tag per token)."""
    tags: list[str] | None = None
    """Token classification: the tag set, in this order; default: the tags of the train split."""
    dev_fraction: float = Field(0.1, gt=0, lt=1)
    """Without a dev file, fine-tuning holds out this stratified, seeded fraction of train."""

    @model_validator(mode="after")
    def _choices_only_for_multiple_choice(self) -> TaskConfig:
        if self.type == "multiple_choice" and not self.choices:
            raise ValueError("multiple_choice tasks need `choices`: the field holding the list of options")
        if self.type != "multiple_choice" and self.choices:
            raise ValueError("`choices` only applies to multiple_choice tasks")
        if self.type == "token_classification" and not self.tokens:
            raise ValueError("token_classification tasks need `tokens`: the field with the list of tokens")
        if self.type != "token_classification" and (self.tokens or self.tags):
            raise ValueError("`tokens` and `tags` only apply to token_classification tasks")
        if self.type != "classification" and self.labels:
            raise ValueError("`labels` only applies to classification tasks (multiple choice uses `choices`)")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("`labels` lists a label twice")
        return self


class PromptConfig(_Strict):
    template: str | None = None
    """Jinja2 template with exactly one `{{ answer }}` slot; ending with the slot is a prefix
    prompt, text after it makes a cloze prompt."""
    templates: list[str] | None = Field(None, min_length=2)
    """Several templates, combined as `combine` says; instead of `template`."""
    combine: Literal["mean_prob", "vote", "select_on_dev", "each"] = "mean_prob"
    """With `templates`: average the label probabilities, majority vote, pick the best template
    on the dev split, or run each template separately and report the spread."""
    answers: dict[str, str | list[str]] | None = None
    """Classification verbalizer: label -> answer string(s); unlisted labels answer by name."""
    answer_pooling: Literal["logsumexp", "mean"] = "logsumexp"
    """How a label's several answer strings combine into one score."""
    shots: int | list[int] = 0
    """Demonstrations per prompt; a list (`[0, 1, 4, 8]`) makes one cell per count: the learning curve."""
    demos: Literal["first", "random", "balanced", "similar"] = "first"
    """`similar`: per test example, the nearest train examples by MiniLM sentence embedding."""
    order: Literal["fixed", "random"] = "fixed"
    """`random`: shuffle the chosen demonstrations (seeded)."""
    demo_sets: int = Field(1, ge=1)
    """Redraw the demonstrations with this many seeds, each a separate cell; reports the spread."""
    separator: str = "\n\n"
    normalize: Literal["none", "length"] = "none"
    """`length`: divide each log-likelihood by the answer's length in characters (lm-eval acc_norm)."""
    chat: bool = False
    """Wrap the prompt in the model's chat template as a user turn; score the assistant's reply."""
    calibrate: Literal["none", "contextual"] = "none"
    """Contextual calibration (Zhao et al. 2021): divide label probabilities by those the prompt
    gives to content-free inputs."""
    content_free: list[str] = ["N/A", "", "[MASK]"]
    chain_of_thought: bool = False
    """Generate reasoning before the answer: demos show `rationale`; zero-shot uses `trigger`."""
    rationale: str = "rationale"
    """Field of the train split with the demonstrations' reasoning."""
    trigger: str = "Let's think step by step."
    answer_format: str = "{{ rationale }} So the answer is {{ answer }}."
    """How a chain-of-thought demonstration fills the answer slot."""
    extract: str | None = None
    """Regex applied to generated text; its first group is mapped to a label through `answers`."""
    samples: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    vote: Literal["majority", "mean_prob"] = "majority"
    max_new_tokens: int = Field(128, ge=1)
    stop: list[str] | None = None
    """Stop strings for generation (default: the separator for chain of thought, else a newline)."""

    @field_validator("shots", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        counts = value if isinstance(value, list) else [value]
        if any(isinstance(c, bool) for c in counts):  # YAML's true/false would count as 1/0 shots
            raise ValueError("`shots` is a number of demonstrations, not true/false")
        return value

    @field_validator("shots")
    @classmethod
    def _non_negative(cls, value: int | list[int]) -> int | list[int]:
        counts = value if isinstance(value, list) else [value]
        if not counts or any(c < 0 for c in counts) or len(set(counts)) != len(counts):
            raise ValueError("`shots` is a number of demonstrations (0 or more), or a list of distinct ones")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PromptConfig:
        if (self.template is None) == (self.templates is None):
            raise ValueError("give exactly one of `template` (one) or `templates` (a list)")
        if "combine" in self.model_fields_set and self.templates is None:
            raise ValueError("`combine` applies to `templates`; with one `template` remove it")
        if self.calibrate == "contextual" and not self.content_free:
            raise ValueError("`calibrate: contextual` needs at least one `content_free` input, e.g. ['N/A']")
        if self.stop is not None and not all(self.stop):
            raise ValueError("`stop` lists an empty string, which would stop before the first token; remove it")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(
                f"`samples: {self.samples}` with `temperature: 0` would repeat one greedy answer; set a temperature > 0"
            )
        if self.extract is not None:
            _check_regex(self.extract)
        if self.demo_sets > 1 and not any(self.shot_counts):
            raise ValueError(
                f"`demo_sets: {self.demo_sets}` draws sets of demonstrations, but `shots` is 0: the sets would be "
                "identical and empty; set shots, or remove demo_sets"
            )
        if self.demo_sets > 1 and self.demos in ("first", "similar") and self.order == "fixed":
            raise ValueError(
                f"`demo_sets: {self.demo_sets}` redraws demonstrations with other seeds, but `demos: {self.demos}` "
                "with `order: fixed` draws the same ones every time (a spread of 0); use `demos: random` or "
                "`balanced`, or `order: random` for other orders of the same demonstrations"
            )
        return self

    @property
    def template_list(self) -> list[str]:
        return self.templates or [self.template]

    @property
    def shot_counts(self) -> list[int]:
        """`shots` as a list (one number of demonstrations, or several)."""
        return self.shots if isinstance(self.shots, list) else [self.shots]

    @property
    def generates(self) -> bool:
        """Whether this prompt generates text (rather than scoring the options)."""
        return self.chain_of_thought or self.samples > 1 or self.extract is not None


def _check_regex(pattern: str) -> None:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"`extract` is not a valid regular expression ({exc})") from None
    if compiled.groups < 1:
        raise ValueError("`extract` needs a capture group, e.g. 'answer is (yes|no)': its first group is the answer")


def _model_from_name(value: Any) -> Any:
    """`model: some-name` is short for `model: {name: some-name}`."""
    return {"name": value} if isinstance(value, str) else value


class FinetuneConfig(_Strict):
    method: Literal["full", "lora", "qlora"] = "lora"
    """`lora` trains low-rank adapters (peft) and merges them into the weights afterwards;
    `qlora` needs bitsandbytes and a CUDA GPU."""
    epochs: float = Field(3, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    """Default: 5e-4 for LoRA, 5e-5 for full fine-tuning."""
    batch_size: int = Field(16, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_length: int = Field(256, ge=8)
    """Tokens per example (longer inputs are truncated)."""
    r: int = Field(8, ge=1)
    alpha: int | None = Field(None, ge=1)
    """LoRA scaling numerator (default 2r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1)
    """Modules LoRA adapts (default: chosen per architecture)."""
    early_stopping: int | None = Field(3, ge=1)
    """Stop after this many evaluations without improvement of the dev metric (null: never)."""
    train_sizes: list[int | Literal["all"]] | None = Field(None, min_length=1)
    """Train on nested seeded subsets of these sizes, one cell each: the learning curve."""
    template: str | None = None
    """Decoder LMs on multiple choice and generation: the prompt template (same syntax as prompting)."""
    chat: bool = False
    """Generation: wrap the prompt in the model's chat template."""
    packing: bool = False
    """Decoder LMs (generation, multiple choice): train on each batch packed into one row without
    padding, every example attending only to itself (checked before training). Pays off with
    flash attention on a GPU; on a CPU, length-grouped batches already waste little padding."""

    @field_validator("train_sizes")
    @classmethod
    def _distinct_sizes(cls, sizes: list[int | str] | None) -> list[int | str] | None:
        if sizes is not None and len(set(sizes)) != len(sizes):
            raise ValueError("lists a size twice: each size is one cell, which would train again")
        if sizes is not None and any(isinstance(n, int) and n < 1 for n in sizes):
            raise ValueError("sizes are numbers of training examples (1 or more) or `all`")
        return sizes


class RunConfig(_Strict):
    prompt: PromptConfig | None = None
    finetune: FinetuneConfig | None = None
    model: ModelConfig | None = None
    """This run's own model; it then ignores the experiment's `model`/`models`."""

    @model_validator(mode="after")
    def _one_kind(self) -> RunConfig:
        if (self.prompt is None) == (self.finetune is None):
            raise ValueError("a run has either `prompt` (prompting) or `finetune` (fine-tuning), exactly one")
        return self

    @field_validator("model", mode="before")
    @classmethod
    def _short_model(cls, value: Any) -> Any:
        return _model_from_name(value)


_FOLDER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
OUTPUT_FILES = ("results.json", "config.yaml", "comparison.json", "report.html", "report.md", "report_files")
"""What taskfit writes into the output folder besides the runs' folders (and `cache`, `mlruns`)."""


class ExperimentConfig(_Strict):
    name: str
    """Names the output folder (default `runs/<name>`)."""
    task: TaskConfig
    model: ModelConfig | None = None
    """The model of every run (default: the default model)."""
    models: list[ModelConfig] | None = Field(None, min_length=1)
    """Several models: every run runs on each (a grid); instead of `model`."""
    runs: dict[str, RunConfig] = Field(min_length=1)
    seed: int | None = None
    """Seed for demonstration draws and bootstrap intervals (default 0)."""
    seeds: list[int] | None = Field(None, min_length=1)
    """Several seeds: every run repeats per seed; instead of `seed`."""
    tracking: Literal["none", "mlflow"] = "none"
    """`mlflow`: log every cell's params, metrics and files to MLflow."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default: a local file store in `<out>/mlruns`)."""

    @field_validator("model", mode="before")
    @classmethod
    def _short_model(cls, value: Any) -> Any:
        return _model_from_name(value)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not _FOLDER_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(
                f"'{name}' names the output folder runs/<name>: use up to 100 letters, digits, '-', '_' or '.' "
                "(not '.' or '..')"
            )
        return name

    @field_validator("seed", "seeds", mode="before")
    @classmethod
    def _non_negative_seeds(cls, value: Any) -> Any:
        seeds = value if isinstance(value, list) else [value]
        if any(isinstance(s, int) and s < 0 for s in seeds):
            raise ValueError("seeds must be 0 or more (numpy's random generator rejects negative seeds)")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _short_models(cls, value: Any) -> Any:
        return [_model_from_name(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_of_each(self) -> ExperimentConfig:
        if self.model is not None and self.models is not None:
            raise ValueError("give either `model` (one) or `models` (a list), not both")
        if self.seed is not None and self.seeds is not None:
            raise ValueError("give either `seed` (one) or `seeds` (a list), not both")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError("`seeds` lists a seed twice")
        if self.models is not None and len({m.model_dump_json() for m in self.models}) != len(self.models):
            raise ValueError("`models` lists one model twice (same name and settings): each would run again")
        return self

    @property
    def model_list(self) -> list[ModelConfig]:
        return self.models or [self.model or ModelConfig()]

    @property
    def seed_list(self) -> list[int]:
        return self.seeds or [0 if self.seed is None else self.seed]

    @field_validator("runs")
    @classmethod
    def _run_names_are_folder_names(cls, runs: dict[str, RunConfig]) -> dict[str, RunConfig]:
        taken = (*OUTPUT_FILES, "cache", "mlruns")
        for name in runs:
            if not _FOLDER_NAME.fullmatch(name) or name.startswith("."):
                raise ValueError(
                    f"run name '{name}' must be up to 100 letters, digits, '-', '_' or '.', not starting with '.' "
                    "(it names a folder)"
                )
            if name.lower() in taken:
                raise ValueError(
                    f"run name '{name}' is taken: taskfit writes a file or folder of that name in the output "
                    "folder. Rename the run"
                )
        return runs


class Experiment(BaseModel):
    """A validated experiment file, with the folder its data paths are relative to."""

    model_config = ConfigDict(frozen=True)
    config: ExperimentConfig
    path: Path

    @property
    def root(self) -> Path:
        return self.path.parent


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    if path.is_dir():
        raise TaskfitError(f"{path}: a folder. Pass the path of your experiment YAML file itself.")
    if not path.is_file():
        raise TaskfitError(f"{path}: no such experiment file. Pass the path of your experiment YAML.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TaskfitError(f"{path}: the file is not UTF-8 text. Save it with UTF-8 encoding.") from None
    try:
        raw = yaml.safe_load(text)
        lines = key_lines(text)
    except yaml.YAMLError as exc:
        raise TaskfitError(f"{path}: this is not valid YAML ({exc}). Fix the syntax at the line shown.") from None
    except TaskfitError as exc:
        raise TaskfitError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise TaskfitError(f"{path}: expected a mapping with `name`, `task` and `runs` at the top level.")
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise TaskfitError(explain(exc, path, lines, raw)) from None
    return Experiment(config=config, path=path.resolve())


def dump_config(config: ExperimentConfig) -> str:
    """The config as YAML with every default filled in, which `load_experiment` reads back to
    an equal config (data paths stay relative to the experiment file's folder)."""
    data = config.model_dump()  # plain Python values; mode="json" would write `.inf` as null
    for run in data["runs"].values():
        if run["prompt"] is not None and run["prompt"]["templates"] is None:
            del run["prompt"]["combine"]  # the schema rejects `combine` next to a single `template`
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
