"""Run one multiple-choice scoring job through lm-evaluation-harness and through taskfit,
check that both give the same per-example scores, and compare wall times.

    python benchmarks/compare_lm_eval.py [--model FOLDER] [--batch-sizes 1,8]

Needs the benchmark venv (benchmarks/requirements.txt) for `lm_eval` and the project venv
for `taskfit`; this script itself uses only the standard library. Every tool run is a
fresh subprocess with a fresh output folder, timed from start to exit (model loading,
data loading and writing results included). Everything lands in benchmarks/out/.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ALIAS = "smollm2-135m-instruct"
TASK = "bench_mc"

LM_EVAL_TASK = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
fewshot_delimiter: "\\n\\n"
target_delimiter: " "
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

TASKFIT_EXPERIMENT = """\
name: {name}
task: {{type: multiple_choice, data: {{train: train.jsonl, test: test.jsonl}}, choices: choices, label: answer}}
model: {{name: {model}, dtype: {dtype}, device: {device}}}
runs:
  {run}:
    prompt:
      template: "Question: {{{{ question }}}}\\nAnswer: {{{{ answer }}}}"
{shots}"""

# (job, number of demos, number of test items)
JOBS = [("zero-shot", 0, 300), ("5-shot", 5, 100)]


def default_model(taskfit: str) -> str | None:
    """The folder `taskfit models` reports for the cached smollm2-135m-instruct, if any."""
    try:
        env = dict(os.environ, COLUMNS="1000")  # keep rich from shortening the path column
        text = subprocess.run([taskfit, "models"], capture_output=True, text=True, timeout=120, env=env).stdout
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    for line in text.splitlines():
        if ALIAS in line:
            for word in line.replace("(", " ").replace(")", " ").split():
                if os.path.isdir(os.path.expanduser(word)) and Path(os.path.expanduser(word), "config.json").is_file():
                    return os.path.expanduser(word)
    cache = Path(
        os.environ.get("TASKFIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "taskfit"
    )
    found = sorted(cache.glob("models/*smollm2*/config.json")) or sorted(cache.glob("models/*/config.json"))
    return str(found[0].parent) if found else None


def cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(f) - f[3] - f[4]) / tick, sum(f) / tick


def wait_until_quiet(max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes use under 0.2 cores; returns seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        b0, _ = cpu_busy()
        time.sleep(3)
        if (cpu_busy()[0] - b0) / 3 < 0.2:
            break
    return time.perf_counter() - start


def timed(cmd: list[str], log: Path, env: dict, args, clean) -> dict:
    """Run cmd until --repeat runs were quiet (other processes used under --max-other-load
    cores), at most --retries extra times, each after `clean()` emptied its output folder (a
    repeated taskfit run would otherwise find every score in its cache). Returns the fastest
    quiet run (else the fastest): its wall time, the child's CPU time, and the cores other
    processes used meanwhile. The last run's output is what the caller reads."""
    best, quiet, tries = None, 0, 0
    while quiet < args.repeat and tries < args.repeat + args.retries:
        tries += 1
        clean()
        waited = wait_until_quiet(args.quiet_wait)
        busy0, child0 = cpu_busy()[0], resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(
                f"failed ({proc.returncode}): {' '.join(cmd)}\n--- last lines of {log}:\n"
                + "".join(log.read_text().splitlines(True)[-25:])
            )
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
        others = max(0.0, (cpu_busy()[0] - busy0 - cpu) / wall)
        run = {"wall": wall, "cpu": cpu, "others": others, "waited": waited, "tries": tries}
        quiet += others <= args.max_other_load
        if best is None or rank(run, args) < rank(best, args):
            best = run
        if others > args.max_other_load:
            print(f"  (other processes used {others:.2f} cores during this run: {wall:.1f} s is noisy)", flush=True)
    best["tries"] = tries
    return best


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run_lm_eval(args, out: Path, job: str, shots: int, n: int, bs: int, env: dict, dtype: str = "float32") -> dict:
    run_dir = out / "lm_eval" / (f"{job}-bs{bs}" + ("" if dtype == "float32" else f"-{dtype}"))
    cmd = [
        args.lm_eval,
        "--model",
        "hf",
        "--model_args",
        f"pretrained={args.model},dtype={dtype}",
        "--tasks",
        TASK,
        "--include_path",
        str(out / "lm_eval_tasks"),
        "--num_fewshot",
        str(shots),
        "--limit",
        str(n),
        "--batch_size",
        str(bs),
        "--log_samples",
        "--output_path",
        str(run_dir),
        "--device",
        args.device,
    ]
    timing = timed(cmd, run_dir / "log.txt", env, args, clean=lambda: fresh(run_dir))
    [samples] = glob.glob(str(run_dir / "**" / f"samples_{TASK}_*.jsonl"), recursive=True)
    rows = {}
    for line in open(samples, encoding="utf-8"):
        s = json.loads(line)
        rows[s["doc"]["id"]] = {
            "label": s["doc"]["answer"],
            "choices": s["doc"]["choices"],
            "scores": [float(r[0]) for r in s["filtered_resps"]],
            "acc": s["acc"],
            "acc_norm": s["acc_norm"],
        }
    return {**timing, "rows": rows}


def run_taskfit(args, out: Path, job: str, shots: int, n: int, dtype: str, env: dict) -> dict:
    name = f"{job}-{dtype}"
    shot_lines = f'      shots: {shots}\n      demos: first\n      separator: "\\n\\n"\n' if shots else ""
    yaml_path = out / f"taskfit-{name}.yaml"
    yaml_path.write_text(
        TASKFIT_EXPERIMENT.format(
            name=f"bench-{name}", model=args.taskfit_model, dtype=dtype, device=args.device, run=job, shots=shot_lines
        ),
        encoding="utf-8",
    )
    run_dir = out / "taskfit" / name
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = out / "taskfit" / f"{name}.log"
    cmd = [args.taskfit, "run", str(yaml_path), "--limit", str(n), "--out", str(run_dir)]
    timing = timed(cmd, log, env, args, clean=lambda: shutil.rmtree(run_dir, ignore_errors=True))
    rows = {}
    for line in open(run_dir / job / "predictions.jsonl", encoding="utf-8"):
        r = json.loads(line)
        rows[r["id"]] = {"label": r["label"], "prediction": r["prediction"], "scores": r["scores"]}
    results = json.loads((run_dir / "results.json").read_text())
    return {**timing, "rows": rows, "accuracy": results[job].get("accuracy")}


def _norm_argmax(scores: list[float], choices: list[str]) -> int:
    """The winner after dividing by the choice's length in characters (lm-eval's acc_norm)."""
    return argmax([s / len(c) for s, c in zip(scores, choices)])


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first index wins ties, like numpy


def compare(ref: dict, other: dict) -> dict:
    """Agreement of `other` (taskfit) with the `ref` (lm-eval) rows, matched by example id."""
    missing = set(ref) ^ set(other)
    same = same_norm = 0
    max_diff, worst = 0.0, None
    for key, r in ref.items():
        o = other.get(key)
        if o is None:
            continue
        same += argmax(r["scores"]) == o.get("prediction", argmax(o["scores"]))
        same_norm += _norm_argmax(r["scores"], r["choices"]) == _norm_argmax(o["scores"], r["choices"])
        for a, b in zip(r["scores"], o["scores"]):
            if abs(a - b) > max_diff:
                max_diff, worst = abs(a - b), key
    n = len(set(ref) & set(other))
    return {
        "n": n,
        "missing": sorted(missing),
        "same": same / n if n else 0.0,
        "same_norm": same_norm / n if n else 0.0,
        "max_diff": max_diff,
        "worst": worst,
    }


def in_rounds(args, job: str, steps: dict) -> tuple[dict, dict]:
    """Run every step (a tool's run of `job`, called with the arguments) once per round, --repeat
    rounds, the tools taking turns: this machine's speed drifts over minutes, and one tool's runs
    all in one stretch would meet a different machine than the other's. Returns each step's
    fastest quiet run (see `timed`; its `tries` summed over the rounds) and its wall time per round."""
    once = argparse.Namespace(**{**vars(args), "repeat": 1})
    best: dict = {}
    walls: dict = {key: [] for key in steps}
    tries = dict.fromkeys(steps, 0)
    for r in range(args.repeat):
        for key, step in steps.items():
            print(f"[{job}] round {r + 1}/{args.repeat}: {key[0]} {key[1]} ...", flush=True)
            run = step(once)
            print(f"  {run['wall']:.1f} s", flush=True)
            walls[key].append(run["wall"])
            tries[key] += run["tries"]
            if key not in best or rank(run, args) < rank(best[key], args):
                best[key] = run
    for key, run in best.items():
        run["tries"] = tries[key]
    return best, walls


def rank(run: dict, args) -> tuple[bool, float]:
    """How a run compares with others of the same tool: quiet before noisy, then faster first."""
    return run["others"] > args.max_other_load, run["wall"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        help="transformers model folder for both tools (default: the folder `taskfit models` "
        f"reports for {ALIAS}; taskfit then gets the alias)",
    )
    ap.add_argument("--taskfit", default=str(REPO / ".venv" / "bin" / "taskfit"))
    ap.add_argument("--lm-eval", dest="lm_eval", default=str(REPO / ".venv-bench" / "bin" / "lm_eval"))
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--batch-sizes", default="1,8", help="lm-eval batch sizes; the first one is the headline")
    ap.add_argument("--dtypes", default="float32,auto", help="taskfit dtypes; float32 must be first")
    ap.add_argument("--jobs", default="zero-shot,5-shot")
    ap.add_argument(
        "--threads", type=int, help="set OMP_NUM_THREADS for both tools (default: torch's own choice, all cores)"
    )
    ap.add_argument(
        "--lm-eval-bf16",
        action="store_true",
        help="also run lm-eval in bfloat16 and compare taskfit's dtype auto with it",
    )
    ap.add_argument("--device", default="cpu", help="where both tools compute: cpu, or cuda on a machine with a GPU")
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=1, help="run each tool this many times and keep the fastest")
    ap.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="a run during which other processes used more CPU cores than this is noisy",
    )
    ap.add_argument("--retries", type=int, default=2, help="extra runs allowed to replace noisy ones")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=300,
        help="before each run, wait up to this many seconds for other processes to go idle",
    )
    args = ap.parse_args()
    explicit = args.model
    args.model = explicit or default_model(args.taskfit)
    if not args.model:
        sys.exit("no model folder: pass --model, or run taskfit once so that `taskfit models` lists a cached copy")
    args.model = str(Path(args.model).expanduser().resolve())
    # With the default model, taskfit gets its alias (which resolves to that very folder), as a user would write it.
    args.taskfit_model = args.model if explicit else ALIAS
    out = Path(args.out).resolve()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    subprocess.run(
        [sys.executable, str(HERE / "make_data.py"), "--out", str(out), "--test", str(args.n_test)], check=True
    )
    (out / "lm_eval_tasks").mkdir(exist_ok=True)
    (out / "lm_eval_tasks" / f"{TASK}.yaml").write_text(
        LM_EVAL_TASK.format(task=TASK, train=out / "train.jsonl", test=out / "test.jsonl"), encoding="utf-8"
    )

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    dtypes = args.dtypes.split(",")
    table, runs, notes = [], [], []
    for job, shots, n in [j for j in JOBS if j[0] in args.jobs.split(",")]:
        n = min(n, args.n_test)
        steps = {
            ("lm-eval", bs): partial(run_lm_eval, out=out, job=job, shots=shots, n=n, bs=bs, env=env)
            for bs in batch_sizes
        }
        steps.update(
            {("taskfit", d): partial(run_taskfit, out=out, job=job, shots=shots, n=n, dtype=d, env=env) for d in dtypes}
        )
        best, walls = in_rounds(args, job, steps)
        lm = {bs: best["lm-eval", bs] for bs in batch_sizes}
        tf = {d: best["taskfit", d] for d in dtypes}
        for bs in batch_sizes:
            lm[bs]["accuracy"] = sum(r["acc"] for r in lm[bs]["rows"].values()) / len(lm[bs]["rows"])
            runs.append((job, f"lm-eval hf float32, batch size {bs}", lm[bs]))
        for dtype in dtypes:
            runs.append((job, f"taskfit dtype {dtype}", tf[dtype]))
        for bs in batch_sizes:
            for dtype in dtypes:
                c = compare(lm[bs]["rows"], tf[dtype]["rows"])
                table.append(
                    {
                        "job": f"{job} ({n} items)",
                        "lm_eval_batch_size": bs,
                        "taskfit_dtype": dtype,
                        "lm_eval_s": lm[bs]["wall"],
                        "taskfit_s": tf[dtype]["wall"],
                        "round_speedups": [a / b for a, b in zip(walls["lm-eval", bs], walls["taskfit", dtype])],
                        **c,
                    }
                )
        if args.lm_eval_bf16 and "auto" in tf:  # is taskfit's bfloat16 as far from lm-eval's bfloat16 as from float32?
            print(f"[{job}] lm-eval bfloat16, batch size {batch_sizes[0]} ...", flush=True)
            lmb = run_lm_eval(args, out, job, shots, n, batch_sizes[0], env, dtype="bfloat16")
            for name, a, b in [
                ("lm-eval bfloat16 vs lm-eval float32", lm[batch_sizes[0]]["rows"], lmb["rows"]),
                ("taskfit auto vs lm-eval bfloat16", lmb["rows"], tf["auto"]["rows"]),
            ]:
                c = compare(a, b)
                notes.append(
                    f"{job}: {name}: same predictions {c['same']:.3f}, max abs score diff {c['max_diff']:.2e} "
                    f"({c['worst']}); lm-eval bfloat16 took {lmb['wall']:.1f} s"
                )
        for bs in batch_sizes[1:]:  # lm-eval against itself: how much does its own batching move scores?
            c = compare(lm[batch_sizes[0]]["rows"], lm[bs]["rows"])
            notes.append(
                f"{job}: lm-eval batch size {bs} vs {batch_sizes[0]}: same predictions {c['same']:.3f}, "
                f"max abs score diff {c['max_diff']:.2e}"
            )

    lines = [
        "| job | lm-eval batch size | taskfit dtype | lm-eval s | taskfit s | speedup | per round | same prediction "
        "| same acc_norm prediction | max abs score diff (id) |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['job']} | {r['lm_eval_batch_size']} | {r['taskfit_dtype']} | {r['lm_eval_s']:.1f} | "
            f"{r['taskfit_s']:.1f} | {r['lm_eval_s'] / r['taskfit_s']:.2f}x | "
            + ", ".join(f"{x:.2f}x" for x in r["round_speedups"])
            + f" | {r['same']:.3f} | "
            f"{r['same_norm']:.3f} | {r['max_diff']:.2e} ({r['worst']}) |"
        )
        if r["missing"]:
            notes.append(f"{r['job']}: ids in only one tool's output: {', '.join(r['missing'][:10])}")
    lines += [
        "",
        "| job | run | wall s | CPU s | other load (cores) | runs | accuracy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for job, what, r in runs:
        cells = [job, what, f"{r['wall']:.1f}", f"{r['cpu']:.1f}", f"{r['others']:.2f}", str(r["tries"])]
        lines.append("| " + " | ".join(cells + [f"{r['accuracy']:.3f}"]) + " |")
    threads = f"{args.threads} thread(s)" if args.threads else "torch default threads"
    header = (
        f"model: {args.model} (taskfit: {args.taskfit_model})  \n"
        f"{os.cpu_count()} CPUs, {threads}, device {args.device}. Each time is the wall "
        f"time of one whole process (start-up and model loading included), fastest of {args.repeat} quiet run(s), "
        f"run in {args.repeat} round(s) in which every tool runs once, taking turns. "
        "Speedup = lm-eval s / taskfit s; 'per round' = the same ratio within each round. "
        "'same prediction' and 'max abs score diff' compare the taskfit run "
        "with the float32 lm-eval run on the same line, example by example (matched by id). "
        f"'other load' is CPU used by other processes during the run: above {args.max_other_load} "
        "the time is noisy.\n\n"
    )
    text = header + "\n".join(lines) + "\n" + "".join(f"\n- {n}" for n in notes) + "\n"
    (out / "results.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps(
            {
                "comparisons": table,
                "runs": [{"job": j, "run": w, **{k: v for k, v in r.items() if k != "rows"}} for j, w, r in runs],
            },
            indent=2,
        )
    )
    print("\n" + text)


if __name__ == "__main__":
    main()
