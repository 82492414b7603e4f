"""The extraction methods side by side on the built-in sentiment contrast (embedded SmolLM2).

Each method's vector is extracted from the training three quarters of the built-in sentiment pairs (the
demo's split), swept on the validation half of the sentiment prompts (layers x signed fractions of the
residual norm, word preference; perplexity/KL on the built-in neutral text) and its best validation
setting (`choose_setting`: the largest score(+f) - score(-f) with perplexity within +20%) is reported on
the test half: the effect score(+f) - score(-f) with a paired bootstrap 95% CI, the same for a random
vector of the same norm at the same setting, and the side effects at +-f. Nothing is chosen on test.

    .venv/bin/python benchmarks/steering_methods.py [--layers 8,12,16,20] [--fractions 0.05,0.1]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import steerlab
from steerlab.data import load_builtin
from steerlab.data.sources import load_word_lists
from steerlab.evaluate import bootstrap_ci, prepare_neutral
from steerlab.steering import extract_mean_difference, extract_pca_center, extract_pca_diff, extract_probe
from steerlab.steering.metrics import behaviour_metric
from steerlab.steering.sweep import Grid, choose_setting, sweep

METHODS = {
    "mean-diff": extract_mean_difference,
    "pca-diff": extract_pca_diff,
    "pca-center": extract_pca_center,
    "probe": extract_probe,
}
SEED = 0


def effect(rows: list[dict], kind: str, fraction: float) -> tuple[float, float, float]:
    """score(+f) - score(-f) over the test prompts, with its paired bootstrap 95% CI."""
    at = {r["fraction"]: r for r in rows if r["vector"] == kind}
    diff = (at[fraction]["item_scores"] - at[-fraction]["item_scores"]).numpy()
    return bootstrap_ci(diff, seed=SEED)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", default="8,12,16,20")
    parser.add_argument(
        "--fractions", default="0.05,0.1", help="positive fractions; each is swept at both signs"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    positive = sorted(float(x) for x in args.fractions.split(","))
    fractions = [-f for f in reversed(positive)] + positive
    started = time.perf_counter()
    lm = steerlab.load_model()
    words = load_word_lists("builtin:sentiment-words", "words")
    pairs_train, _ = load_builtin("sentiment").split([0.75, 0.25], seed=SEED)
    prompts_val, prompts_test = load_builtin("sentiment-prompts").split([0.5, 0.5], seed=SEED)
    neutral = prepare_neutral(lm, load_builtin("neutral-text"))
    val_metric = behaviour_metric(lm, prompts_val, words)
    test_metric = behaviour_metric(lm, prompts_test, words)
    results = {}
    for name, extract in METHODS.items():
        vector = extract(lm, pairs_train, layers, progress=False)
        val = sweep(
            lm, vector, val_metric, Grid(layers, fractions), neutral=neutral, controls=False, progress=False
        )
        choice = choose_setting(val)
        f = choice.fraction
        test = sweep(
            lm,
            vector,
            test_metric,
            Grid([choice.layer], [-f, f]),
            split="test",
            neutral=neutral,
            seed=SEED,
            progress=False,
        )
        base = next(r for r in test if r["vector"] == "none")
        steered = [r for r in test if r["vector"] == "steering"]
        results[name] = {
            "layer": choice.layer,
            "fraction": f,
            "validation_effect": choice.effect,
            "test_effect": effect(test, "steering", f),
            "random_effect": effect(test, "random", f),
            "p_base": base["score"],
            "perplexity_base": base["perplexity"],
            "perplexity_rise": max(r["perplexity"] for r in steered) / base["perplexity"] - 1,
            "kl_max": max(r["kl"] for r in steered),
        }
        print(name, json.dumps(results[name]), flush=True)
    print()
    print(
        "| method | layer | f | validation effect | test effect [95% CI] | random vector, same norm | perplexity rise | KL (max of ±f) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        eff, rnd = r["test_effect"], r["random_effect"]
        print(
            f"| {name} | {r['layer']} | {r['fraction']:g} | {r['validation_effect']:+.3f} | "
            f"{eff[0]:+.3f} [{eff[1]:+.3f}, {eff[2]:+.3f}] | {rnd[0]:+.3f} [{rnd[1]:+.3f}, {rnd[2]:+.3f}] | "
            f"{100 * r['perplexity_rise']:+.1f}% | {r['kl_max']:.4f} |"
        )
    summary = {
        "methods": results,
        "layers": layers,
        "fractions": fractions,
        "n_validation": len(prompts_val.prompts),
        "n_test": len(prompts_test.prompts),
        "p_base_test": next(iter(results.values()))["p_base"],
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
