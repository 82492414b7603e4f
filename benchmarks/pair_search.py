"""Contrast-pair search on the embedded SmolLM2 (built-in sentiment contrast, the demo's splits, layer and
fraction): the hand-written training pairs' mean-difference vector against the vector chosen on validation
among a greedy subset of the built-in pool, a gradient-guided token edit of the best pool pair and their
union, all added at the same norm; then effect per norm against pair length (1-64 tokens).

Figures are test effects per unit of injected norm, printed as ratios to the hand-written vector's measured
in the same run, with a paired bootstrap 95% CI of the difference over test prompts. The last line is one
JSON object.

    .venv/bin/python benchmarks/pair_search.py [--layer 20] [--steps 8] [--max-pairs 5] [--out results/pair_search]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from steerlab.finetune.commands import PairSearchArgs, run_pair_search
from steerlab.finetune.pair_search_report import CANDIDATE_COLUMNS, LENGTH_COLUMNS
from steerlab.finetune.report import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--max-pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/pair_search")
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    started = time.perf_counter()
    args = PairSearchArgs(
        out=ns.out, layer=ns.layer, fraction=ns.fraction, max_pairs=ns.max_pairs, steps=ns.steps,
        top_k=ns.top_k, candidates=ns.candidates, seed=ns.seed, progress=False,
    )  # fmt: skip
    result = run_pair_search(args)
    print(markdown_table(result["candidates"], CANDIDATE_COLUMNS))
    print(markdown_table(result["lengths"], LENGTH_COLUMNS))
    hand = result["effect_per_norm_handwritten"]
    by = {r["vector"]: r for r in result["candidates"]}
    for name, row in by.items():
        print(f"test effect per norm {name} / handwritten = {row['effect_per_norm'] / hand:.3g}")
    for row in result["lengths"]:
        print(f"length {row['length']}: effect per norm / handwritten = {row['effect_per_norm'] / hand:.3g}")
    summary = {
        "effect_per_norm_handwritten": hand,
        "effect_per_norm_searched": result["effect_per_norm_searched"],
        "ci_low_difference": result["ci_low_difference"],
        "ci_high_difference": result["ci_high_difference"],
        "difference": result["difference"],
        "searched": result["searched"],
        "ratio_searched_handwritten": result["effect_per_norm_searched"] / hand,
        "effect_per_norm_test": {name: row["effect_per_norm"] for name, row in by.items()},
        "perplexity": {name: row.get("perplexity") for name, row in by.items()},
        "length_effect_per_norm": {str(r["length"]): r["effect_per_norm"] for r in result["lengths"]},
        "length_ci": {str(r["length"]): [r["ci_low"], r["ci_high"]] for r in result["lengths"]},
        "length_measured_tokens": {str(r["length"]): r["measured_tokens"] for r in result["lengths"]},
        "norm": result["norm"],
        "layer": ns.layer,
        "found_pairs": result["found_pairs"],
        "token_search": result["token_search"],
        "seconds_total": time.perf_counter() - started,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
