"""Steering vs trained interventions on the embedded SmolLM2 (built-in sentiment contrast, the demo's
splits): the mean-difference (CAA) vector, a trained residual bias vector and LoRA at one middle layer,
with equal training budgets (steps, pairs per step, learning rate, seed).

Effects are the mean per-prompt shift of p(positive next word) on the held-out test prompts with bootstrap
95% CIs; the trained methods' effects are also printed as ratios to CAA's at 0.1 of the residual norm,
measured in the same run. The last line is one JSON object.

    .venv/bin/python benchmarks/compare.py [--layers 15] [--steps 30] [--rank 4] [--out results/compare]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from steerlab.finetune.commands import CompareArgs, run_compare
from steerlab.finetune.report import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="15")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--out", default="results/compare")
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    started = time.perf_counter()
    args = CompareArgs(
        out=ns.out, layers=ns.layers, steps=ns.steps, batch_size=ns.batch_size, lr=ns.lr, rank=ns.rank,
        progress=False,
    )  # fmt: skip
    result = run_compare(args)
    rows = result["rows"]
    print(markdown_table(rows))
    first = args.layers[0]
    by = {r["method"]: r for r in rows if r["layer"] == first}
    lora = next(r for m, r in by.items() if m.startswith("lora"))
    caa = by["caa@0.1"]
    for name, row in (("bias", by["bias"]), ("lora", lora), ("caa@|bias|", by["caa@|bias|"])):
        print(f"layer {first}: effect {name} / effect caa@0.1 = {row['effect'] / caa['effect']:.3g}")
    summary = {
        "layer": first,
        "effect_caa": caa["effect"],
        "effect_caa_ci": [caa["ci_low"], caa["ci_high"]],
        "effect_caa_norm_matched": by["caa@|bias|"]["effect"],
        "effect_bias": by["bias"]["effect"],
        "effect_bias_ci": [by["bias"]["ci_low"], by["bias"]["ci_high"]],
        "effect_lora": lora["effect"],
        "effect_lora_ci": [lora["ci_low"], lora["ci_high"]],
        "cos_bias_caa": by["bias"]["cos_with_caa"],
        "params_bias": by["bias"]["trainable_params"],
        "params_lora": lora["trainable_params"],
        "kl_caa": caa["kl"],
        "kl_bias": by["bias"]["kl"],
        "kl_lora": lora["kl"],
        "ppl_base": by["unsteered"]["perplexity"],
        "ppl_caa": caa["perplexity"],
        "ppl_bias": by["bias"]["perplexity"],
        "ppl_lora": lora["perplexity"],
        "seconds_bias": by["bias"]["train_seconds"],
        "seconds_lora": lora["train_seconds"],
        "seconds_caa": caa["train_seconds"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "rank": args.rank,
        "tokens_bias": by["bias"]["tokens"],
        "tokens_lora": lora["tokens"],
        "layers": args.layers,
        "seconds_total": time.perf_counter() - started,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
