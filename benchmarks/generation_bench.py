"""Generation throughput: taskfit's generator vs one HF `generate` per sample (or per request).

    python benchmarks/generation_bench.py                 # 50 prompts, dtype float32 and auto
    python benchmarks/generation_bench.py --prompts 10 --dtypes float32 --threads 1

On a shared machine use --threads 1: with every core already busy, torch's default of one
thread per core makes each step many times slower (its threads wait on each other).

Two jobs on the default model, from the chat-formatted prompts below, up to `--new-tokens`:
- sampling: `--samples` samples per prompt at temperature 0.7 (no top-k, no top-p); taskfit
  computes each prompt once, the peer calls `generate` once per sample;
- greedy: one continuation per prompt (a generation task's test split); taskfit decodes the
  prompts together in its slots, the peer calls `generate` once per prompt.
taskfit gets all requests in one call, as a prompted run hands it a chunk of examples.
Tokens are counted as generated, EOS included; tokens/s is tokens over wall time. The
greedy job's outputs are compared token for token (`greedy_same`: the fraction of prompts
whose tokens agree; in float32 all must; in bfloat16 the two compute different matrix
shapes, batch 1 against steps of 8 to 64 rows, and a near-tie may go either way). For a dtype other
than float32 the greedy outputs are also compared with taskfit's own float32 ones
(`float32_same`, and `float32_shared_tokens`: the mean number of leading tokens that agree).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from taskfit.models.base import GenerationRequest
from taskfit.models.generation import Generator
from taskfit.models.hf import _max_length, pick_precision
from taskfit.models.registry import resolve

SUBJECTS = [
    "the moon",
    "a bicycle",
    "bread",
    "rain",
    "the internet",
    "a library",
    "coffee",
    "volcanoes",
    "chess",
    "bees",
]
ASKS = [
    "Explain {} to a child.",
    "Write two sentences about {}.",
    "What is the most surprising fact about {}?",
    "Give three uses of {}.",
    "Describe {} in the style of a weather report.",
]


def prompts(tokenizer, n: int) -> list[str]:
    questions = [ask.format(s) for ask in ASKS for s in SUBJECTS][:n]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]


def ours(gen: Generator, texts: list[str], samples: int, new: int) -> int:
    temperature = 0.7 if samples > 1 else 0.0
    reqs = [
        GenerationRequest(text, max_new_tokens=new, temperature=temperature, samples=samples, seed=i)
        for i, text in enumerate(texts)
    ]
    return sum(len(g.tokens) + (g.finish == "eos") for gens in gen.run_all(reqs) for g in gens)


def naive(model, tokenizer, texts: list[str], samples: int, new: int) -> int:
    tokens = 0
    for i, text in enumerate(texts):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], device=model.device)
        for j in range(samples):
            torch.manual_seed(1000 * i + j)
            sampling = {"do_sample": False}
            if samples > 1:
                sampling = {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            tokens += out.shape[1] - ids.shape[1]
    return tokens


def greedy_tokens(gen: Generator, texts: list[str], new: int) -> list[list[int]]:
    """taskfit's greedy tokens per prompt, all prompts in one call."""
    return [g.tokens for (g,) in gen.run_all([GenerationRequest(text, max_new_tokens=new) for text in texts])]


def float32_agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(fraction of prompts whose tokens equal the reference's, mean number of leading tokens that agree)."""
    shared = []
    for a, b in zip(tokens, reference):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shared.append(n)
    return sum(a == b for a, b in zip(tokens, reference)) / len(tokens), sum(shared) / len(shared)


def greedy_agreement(model, tokenizer, gen: Generator, texts: list[str], new: int) -> tuple[float, list[list[int]]]:
    """Fraction of prompts whose greedy tokens from taskfit (all prompts in one call) equal HF's,
    and taskfit's tokens."""
    ours = greedy_tokens(gen, texts, new)
    same = 0
    for text, tokens in zip(texts, ours):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], device=model.device)
        mask = torch.ones_like(ids)
        ref = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=tokenizer.pad_token_id
        )
        ref = ref[0, ids.shape[1] :].tolist()
        ref = [t for t in ref if t not in gen.stop_ids]
        same += ref == tokens
    return same / len(texts), ours


def timed(fn, *args) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "auto"], help="model.dtype values")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias or folder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "generation")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = prompts(tokenizer, args.prompts)
    print(f"model {path}\n{len(texts)} prompts x {args.samples} samples, {args.new_tokens} new tokens, T=0.7")
    print(f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, load average {os.getloadavg()}")
    results, float32_tokens = {}, None
    for dtype in args.dtypes:
        precision = pick_precision(dtype, args.device)  # both sides compute alike: weights and autocast
        model = AutoModelForCausalLM.from_pretrained(path, dtype=precision.weights).to(args.device).eval()
        gen = Generator(model, tokenizer, _max_length(model, tokenizer))
        print(f"\n[{dtype}: {precision.name}]")
        with torch.no_grad(), precision.autocast(args.device):
            ours(gen, texts[:1], 2, 4)  # warm-up
            for job, samples in (("sampling", args.samples), ("greedy", 1)):
                t_ours, s_ours = timed(ours, gen, texts, samples, args.new_tokens)
                t_hf, s_hf = timed(naive, model, tokenizer, texts, samples, args.new_tokens)
                r_ours, r_hf = t_ours / s_ours, t_hf / s_hf
                peer = "HF generate/" + ("sample" if samples > 1 else "prompt")
                print(f"  {job}: {'taskfit':19s} {t_ours:6d} tokens in {s_ours:7.1f} s = {r_ours:7.1f} tokens/s")
                print(f"  {job}: {peer:19s} {t_hf:6d} tokens in {s_hf:7.1f} s = {r_hf:7.1f} tokens/s")
                print(f"  {job}: ratio {r_ours / r_hf:.2f}x   load average {os.getloadavg()}")
                results[f"{dtype}/{job}"] = {
                    "precision": precision.name,
                    "taskfit_tokens_per_s": r_ours,
                    "hf_tokens_per_s": r_hf,
                    "ratio": r_ours / r_hf,
                    "prompts": len(texts),
                    "samples": samples,
                    "new_tokens": args.new_tokens,
                    "device": args.device,
                }
            same, tokens = greedy_agreement(model, tokenizer, gen, texts, args.new_tokens)
            results[f"{dtype}/greedy"]["greedy_same"] = same
            print(f"  greedy tokens equal to HF's for {same:.0%} of the prompts")
        if precision.compute == torch.float32:
            float32_tokens = tokens
            continue
        if float32_tokens is None:  # taskfit's own float32 greedy outputs, the reference
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
            with torch.no_grad():
                float32_tokens = greedy_tokens(Generator(model, tokenizer, gen.max_length), texts, args.new_tokens)
        same, shared = float32_agreement(tokens, float32_tokens)
        results[f"{dtype}/greedy"].update(float32_same=same, float32_shared_tokens=shared)
        print(f"  greedy tokens equal to taskfit float32's for {same:.0%} of the prompts ({shared:.1f} leading agree)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
