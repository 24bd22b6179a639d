"""Starts that one example's queries share: what declaring them saves, side by side in one process.

The job: contextual calibration with `demos: similar` on the sentiment reviews of
`examples/` (60 test, 30 train), default model. Each example's query and its three
content-free queries start with the example's own demonstrations; taskfit declares them the
queries' shared start, so each example's demonstrations run once (the prefixes of a call
computed together in batches, the rows after different prefixes in the same batches). The
baseline is the same strategy with the same requests sent with nothing declared shared, so
every query runs its whole prompt. The model is loaded once and the two take turns (each
keeps its fastest run); predictions must agree (scores may differ in the last bits: the
layouts differ).

    .venv/bin/python benchmarks/prefix_bench.py [--dtype float32] [--shots 6] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"

EXPERIMENT = """\
name: prefix-bench
task:
  type: classification
  data: {{train: sentiment_train.csv, test: sentiment_test.csv}}
  label: label
  labels: [negative, neutral, positive]
runs:
  similar:
    prompt:
      template: "Review: {{{{ text }}}}\\nSentiment: {{{{ answer }}}}"
      shots: {shots}
      demos: similar
      calibrate: contextual
"""


class Unshared:
    """The model with every request's declared shared start dropped: the baseline."""

    def __init__(self, lm):
        self.lm, self.identity = lm, lm.identity

    def loglikelihood(self, requests):
        return self.lm.loglikelihood([r._replace(shared=0) for r in requests])

    def loglikelihood_exact(self, requests):
        return self.lm.loglikelihood_exact([r._replace(shared=0) for r in requests])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shots", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2, help="turns of each; the fastest counts")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "prefix")
    args = parser.parse_args()

    import taskfit
    from taskfit.config import ModelConfig
    from taskfit.prompting.strategy import ScoreStrategy

    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("sentiment_train.csv", "sentiment_test.csv"):
        shutil.copy(EXAMPLES / name, args.out / name)
    path = args.out / "experiment.yaml"
    path.write_text(EXPERIMENT.format(shots=args.shots))
    task = taskfit.load_task(path)
    cfg = taskfit.load_experiment(path).config.runs["similar"].prompt
    strategy = ScoreStrategy(cfg, task, 0, "runs.similar.prompt", cfg.template_list)
    examples = list(task.split("test"))
    for ex in examples:  # MiniLM's embeddings, before any timing
        strategy.prompts[0].builder.demo_text(ex)
    lm = taskfit.load_model(ModelConfig(dtype=args.dtype))
    strategy.predict(examples[:2], lm)  # warm-up: first calls pay one-off costs
    runs: dict[str, dict] = {}
    for _ in range(args.repeat):
        for name, model in (("shared", lm), ("not shared", Unshared(lm))):
            lm.scorer._prefixes.clear()  # every run computes its own prefixes
            tokens = lm.scorer.tokens
            start = time.perf_counter()
            rows = strategy.predict(examples, model)
            seconds = time.perf_counter() - start
            if name not in runs or seconds < runs[name]["seconds"]:
                runs[name] = {
                    "seconds": seconds,
                    "tokens": lm.scorer.tokens - tokens,
                    "predictions": [r["prediction"] for r in rows],
                }
    shared, plain = runs["shared"], runs["not shared"]
    same = sum(a == b for a, b in zip(shared["predictions"], plain["predictions"])) / len(examples)
    result = {
        "examples": len(examples),
        "shots": args.shots,
        "dtype": lm.precision.name,
        "shared_s": shared["seconds"],
        "not_shared_s": plain["seconds"],
        "speedup": plain["seconds"] / shared["seconds"],
        "shared_tokens": shared["tokens"],
        "not_shared_tokens": plain["tokens"],
        "same_predictions": same,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    text = (
        f"{len(examples)} reviews, {args.shots} similar demonstrations each, contextual calibration, default model, "
        f"{lm.precision.name}; fastest of {args.repeat} turns each, model loaded once.\n\n"
        "| requests | s | tokens computed | same predictions |\n|---|---:|---:|---:|\n"
        f"| each example's demonstrations declared shared | {shared['seconds']:.1f} | {shared['tokens']:,} "
        f"| {same:.0%} |\n"
        f"| nothing declared shared | {plain['seconds']:.1f} | {plain['tokens']:,} | |\n\n"
        f"Speedup: {result['speedup']:.2f}x\n"
    )
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
