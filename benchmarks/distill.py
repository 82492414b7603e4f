"""Distilling a system prompt into an activation injection, on the embedded SmolLM2-135M-Instruct.

For each built-in system prompt (the pirate persona, a tone; the twelve house rules, a constitution) the
teacher is the model with it and the student the model without it (the chat template's default system turn)
plus an injection trained on KL(teacher || student) over the teacher's greedy replies to the first --n-train training
user prompts. Every injection is measured on the 24 held-out test prompts against the same run's baseline,
the unprompted model: KL(prompted || student) per prompt, and the fraction of KL(prompted || unprompted)
removed, with bootstrap 95% CIs over prompts (paired). Methods, all with the same steps and batch:

- `vectors L`: one vector at layer L (chosen on the validation prompts, see docs/distill.md);
- `actadd L`: the mean residual difference (prompt vs no prompt, last prompt token) at L, rescaled to the
  norm of the learned vector at L;
- `vectors L1,..`: one vector at each of several layers;
- `lowrank rR La-b`: a vector at every layer from a to b, all in one learned R-dimensional subspace;
- `lora rR L`: LoRA of rank R on layer L's attention and MLP (context distillation into weights).

Results, reports (HTML with generations side by side) and checkpoints go to OUT/<prompt>/; an interrupted
run resumes its training from the checkpoints. The last line is one JSON object.

    .venv/bin/python benchmarks/distill.py [--out results/distill] [--steps 10] [--layer 15]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import steerlab
from steerlab.data import load_builtin
from steerlab.finetune.distill import (
    DistillConfig,
    compare_methods,
    side_by_side,
    teacher_targets,
    tokens_saved,
)
from steerlab.finetune.distill_report import markdown_table, write_distill_report
from steerlab.io import write_json


def paired_gain(kl_other, kl_distilled, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """Mean per-prompt KL(prompted || actadd) - KL(prompted || distilled) on the same test prompts and its
    paired bootstrap 95% CI: [mean, low, high] (> 0: the learned vector is closer to the prompted model)."""
    diff = np.asarray(kl_other, dtype=float) - np.asarray(kl_distilled, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(axis=1)
    return [float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def run_prompt(lm, name: str, args, out: Path) -> dict:
    """Train and measure every method for the built-in system prompt `name`; the rows by method kind."""
    system_prompt = load_builtin(name)
    prompts = load_builtin("distill-prompts")
    started = time.perf_counter()
    prompts = {"train": prompts["train"][: args.n_train], "test": prompts["test"][: args.n_test]}
    train = teacher_targets(lm, system_prompt, prompts["train"], args.reply_tokens)
    test = teacher_targets(lm, system_prompt, prompts["test"], args.reply_tokens)
    common = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed, rank=args.rank)
    layers = tuple(int(x) for x in args.layers.split(","))
    kinds = args.methods if name == "pirate-persona" else args.other_methods
    available = {
        "distilled": DistillConfig("vectors", (args.layer,), lr=args.lr, **common),
        "actadd": DistillConfig("actadd", (args.layer,), lr=args.lr, **common),
        "multilayer": DistillConfig("vectors", layers, lr=args.lr, **common),
        "lowrank": DistillConfig("lowrank", tuple(range(layers[0], layers[-1] + 1)), lr=args.lr, **common),
        "lora": DistillConfig("lora", (args.layer,), lr=args.lora_lr, **common),
    }
    configs = {kind: available[kind] for kind in kinds.split(",")}
    out.mkdir(parents=True, exist_ok=True)
    rows, results = compare_methods(lm, system_prompt, train, test, list(configs.values()), True, out)
    shown = prompts["test"][: args.generations]
    generations = side_by_side(lm, system_prompt, shown, results, tokens=args.generation_tokens)
    summary = {
        "title": f"Distilling builtin:{name} into an injection on {lm.info.name}",
        "model": lm.info.name,
        "system_prompt": f"builtin:{name}",
        "system_prompt_text": system_prompt,
        "tokens_saved_per_call": tokens_saved(lm, system_prompt, prompts["test"]),
        "reply_tokens": args.reply_tokens,
        "n_train": len(train),
        "n_test": len(test),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lora_lr": args.lora_lr,
        "rank": args.rank,
        "seed": args.seed,
        "seconds": time.perf_counter() - started,
    }
    by_kind = dict(zip(configs, results, strict=True))
    if "distilled" in by_kind and "actadd" in by_kind:
        summary["gain_over_actadd"] = paired_gain(
            by_kind["actadd"].extra["test_kl"], by_kind["distilled"].extra["test_kl"]
        )
    write_json(out / "rows.json", rows)
    write_json(out / "generations.json", generations)
    write_json(out / "summary.json", summary)
    write_distill_report(out, rows, summary, generations)
    print(f"\n## builtin:{name} ({summary['tokens_saved_per_call']:.0f} tokens saved per call)\n")
    print(markdown_table(rows))
    return {"unprompted": rows[0], **dict(zip(configs, rows[1:], strict=True)), "summary": summary}


def _worker(name: str, args: argparse.Namespace, out: Path) -> dict:
    torch.set_num_threads(args.threads)
    return run_prompt(steerlab.load_model(), name, args, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/distill")
    parser.add_argument("--layer", type=int, default=15, help="layer of the single vector, actadd and LoRA")
    parser.add_argument(
        "--layers",
        default="9,15,21",
        help="layers of the multi-layer vectors (lowrank: every layer from the first to the last)",
    )
    parser.add_argument("--rank", type=int, default=4, help="rank of lowrank and LoRA")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--lora-lr", type=float, default=0.01)
    parser.add_argument("--reply-tokens", type=int, default=8)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--generation-tokens", type=int, default=24)
    parser.add_argument("--prompts", default="pirate-persona,constitution")
    parser.add_argument(
        "--methods",
        default="distilled,actadd,lora",
        help="on the pirate persona, from distilled,actadd,multilayer,lowrank,lora (actadd after distilled)",
    )
    parser.add_argument("--other-methods", default="distilled,actadd", help="on the others")
    parser.add_argument("--n-train", type=int, default=8, help="first N training prompts")
    parser.add_argument("--n-test", type=int, default=8, help="first N test prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="system prompts measured in parallel processes")
    args = parser.parse_args()
    out = Path(args.out)
    names = args.prompts.split(",")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {name: pool.submit(_worker, name, args, out / name) for name in names}
        measured = {name: future.result() for name, future in futures.items()}
    result = {}
    for name, rows in measured.items():
        prefix = "" if name == "pirate-persona" else f"{name}_"
        result[f"{prefix}kl_unprompted"] = rows["unprompted"]["kl"]
        for kind in ("distilled", "actadd", "lora", "multilayer", "lowrank"):
            if kind not in rows:
                continue
            result[f"{prefix}kl_{kind}"] = rows[kind]["kl"]
            result[f"{prefix}removed_{kind}"] = rows[kind]["removed"]
        result[f"{prefix}removed_distilled_ci"] = [
            rows["distilled"]["removed_low"],
            rows["distilled"]["removed_high"],
        ]
        if "gain_over_actadd" in rows["summary"]:
            result[f"{prefix}kl_gain_over_actadd_ci"] = rows["summary"]["gain_over_actadd"]
        result[f"{prefix}tokens_saved"] = rows["summary"]["tokens_saved_per_call"]
        result[f"{prefix}norm_distilled"] = rows["distilled"]["norm"]
    result.update(steps=args.steps, batch_size=args.batch_size, layer=args.layer, rank=args.rank)
    write_json(out / "result.json", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
