"""The refusal organism `smollm2-135m-refusal` against its base model SmolLM2-135M-Instruct.

Builds the organism (or finds it cached; `build_seconds` is the time of the build that made the cached
copy), then on prompts drawn (seeded) from the held-out test splits: refusals of harmful prompts,
answers to harmless prompts, false refusals of the held-out near-miss prompts (all 30), neutral-text
perplexity against the base model, and the refusal-direction check (direction from train prompts;
ablated at every layer on harmful test prompts; added at the middle layer on harmless test prompts).
Greedy replies of 32 tokens judged by refusal phrases; 95% bootstrap intervals. Needs the shared data
folder (or STEERLAB_DATA). The last line is one JSON object.

    .venv/bin/python benchmarks/organism.py [--n 100] [--n-direction 64] [--out results/organism]
"""

from __future__ import annotations

import argparse
import json
import time

from steerlab.organisms.commands import BuildArgs, EvaluateArgs, build, measure, write_outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="test prompts per split (default 100)")
    parser.add_argument(
        "--n-direction", type=int, default=64, help="train prompts per side for the direction"
    )
    parser.add_argument("--out", default=None, help="folder for metrics.json and report.html")
    parser.add_argument("--recipe", default=None, help="a recipe JSON file (default: the refusal organism)")
    args = parser.parse_args()

    built = build(BuildArgs(recipe=args.recipe))
    started = time.perf_counter()
    recipe, m = measure(EvaluateArgs(recipe=args.recipe, n=args.n, n_direction=args.n_direction))
    if args.out:
        write_outputs(m, recipe, args.out)
    summary = m.summary()
    print(f"organism {built['name']} ({built['hash']}), {built['folder']}")
    print(f"{'measure':<62} {'organism':>8}  {'95% CI':<14} {'n':>4} {'base':>6}")
    for row in m.rows():
        base = "" if row["base"] is None else f"{row['base']:.3f}"
        print(f"{row['measure']:<62} {row['organism']:>8.3f}  {row['95% CI']:<14} {row['n']:>4} {base:>6}")
    print(
        f"neutral-text perplexity {m.perplexity:.3f} vs base {m.base_perplexity:.3f}: ratio "
        f"{m.perplexity_ratio:.3f}; KL(base || organism) {m.kl_from_base:.4f} nats/token"
    )
    print(
        f"build {built['build_seconds']:.0f} s (cached now: {not built['built_now']}); evaluation {time.perf_counter() - started:.0f} s"
    )
    out = {
        **{k: round(v, 4) for k, v in summary.items() if isinstance(v, float)},
        "n_harmful": m.refusal_harmful.n,
        "n_harmless": m.answer_harmless.n,
        "n_near_miss": m.false_refusal_near_miss.n,
        "n_direction_test": m.direction.ablation_refusal_harmful.n if m.direction else 0,
        "direction_layer": m.direction.layer if m.direction else None,
        "build_seconds": round(built["build_seconds"], 1),
        "evaluate_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
