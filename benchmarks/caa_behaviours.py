"""CAA on the seven behaviours of Rimsky et al. with the embedded model: layer and multiplier chosen on
validation, reported on the held-out test split, with a random-vector control.

Reads ../shared/data/caa/<behaviour>/{generate,test_ab}.json (or fetches them with --fetch). Writes
docs/img/caa_behaviours.png and a JSON/markdown table; the last line printed is one JSON object.

    .venv/bin/python benchmarks/caa_behaviours.py [--train 300] [--layers 8,11,14,17,20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import steerlab  # noqa: E402
from steerlab.data import CAA_BEHAVIOURS, fetch_caa, load_caa_json  # noqa: E402
from steerlab.evaluate import ab_scores, bootstrap_ci, prepare_ab  # noqa: E402
from steerlab.io import atomic_write_text  # noqa: E402
from steerlab.steering import extract_caa  # noqa: E402
from steerlab.steering.sweep import Grid, choose_setting, sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "caa"


def data_path(behaviour: str, split: str, fetch: bool) -> Path:
    local = SHARED / behaviour / f"{split}.json"
    return local if local.exists() and not fetch else fetch_caa(behaviour, split)


def run_behaviour(lm, behaviour: str, args) -> tuple[dict, list[dict]]:
    generate = load_caa_json(data_path(behaviour, "generate", args.fetch), name=behaviour)
    test = load_caa_json(data_path(behaviour, "test_ab", args.fetch), name=f"{behaviour}-test")
    train, validation = generate.split([0.8, 0.2], seed=0)
    train, validation = train[: args.train], validation[: args.validation]
    layers = [int(x) for x in args.layers.split(",")]
    vector = extract_caa(lm, train, layers, progress=False)
    prepared = {name: prepare_ab(lm, ds) for name, ds in (("validation", validation), ("test", test))}

    def metric_for(split):
        return lambda model: {
            "score": (s := ab_scores(model, prepared[split])).p_matching,
            "p_first": s.p_first,
        }

    fractions = [float(x) for x in args.fractions.split(",")]
    rows = sweep(
        lm,
        vector,
        metric_for("validation"),
        Grid(layers, fractions),
        split="validation",
        controls=False,
        progress=False,
    )
    choice = choose_setting(rows)  # no side-effect filter: no neutral text here
    layer, m = choice.layer, vector.multiplier_for_fraction(choice.layer, choice.fraction)
    per_item = {}
    for name, vec, mult in (
        ("plus", vector, m),
        ("minus", vector, -m),
        ("rand_plus", vector.random_like(), m),
        ("rand_minus", vector.random_like(), -m),
        ("base", vector, 0.0),
    ):
        with torch.no_grad(), vec.apply(lm, layer=layer, multiplier=mult):
            scores = ab_scores(lm, prepared["test"])
        per_item[name] = scores
    effect, low, high = bootstrap_ci((per_item["plus"].p_matching - per_item["minus"].p_matching).numpy())
    rand = (per_item["rand_plus"].p_matching - per_item["rand_minus"].p_matching).numpy()
    result = {
        "behaviour": behaviour,
        "n_train": len(train),
        "letters_after_balancing": vector.metadata["dataset"]["letter_counts"],
        "layer": layer,
        "fraction": choice.fraction,
        "vector_norm": vector.norm(layer),
        "residual_norm": vector.residual_norm(layer),
        "validation_effect": choice.effect,
        "test_p_base": float(per_item["base"].p_matching.mean()),
        "test_p_minus": float(per_item["minus"].p_matching.mean()),
        "test_p_plus": float(per_item["plus"].p_matching.mean()),
        "test_effect": effect,
        "test_effect_ci": [low, high],
        "random_effect": float(rand.mean()),
        "test_pA_base": float(per_item["base"].p_first.mean()),
        "test_pA_minus": float(per_item["minus"].p_first.mean()),
        "test_pA_plus": float(per_item["plus"].p_first.mean()),
    }
    return result, rows


def plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["behaviour"] for r in results]
    x = range(len(results))
    for offset, key, label in (
        (-0.2, "test_p_minus", "−m"),
        (0.0, "test_p_base", "unsteered"),
        (0.2, "test_p_plus", "+m"),
    ):
        ax.bar([i + offset for i in x], [r[key] for r in results], width=0.2, label=label)
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(list(x), names, rotation=25, ha="right")
    ax.set_ylabel("p(answer matching the behaviour), test split")
    ax.set_title("CAA on SmolLM2-135M: layer and multiplier chosen on validation")
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def markdown(results: list[dict]) -> str:
    lines = [
        "| behaviour | layer | ‖m·v‖/‖h‖ | p(match) −m | unsteered | +m | effect [95% CI] | random ctrl | p(A) −m / 0 / +m |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in results:
        lo, hi = r["test_effect_ci"]
        lines.append(
            f"| {r['behaviour']} | {r['layer']} | {r['fraction']:.2f} | {r['test_p_minus']:.3f} | {r['test_p_base']:.3f} "
            f"| {r['test_p_plus']:.3f} | {r['test_effect']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['random_effect']:+.3f} "
            f"| {r['test_pA_minus']:.2f} / {r['test_pA_base']:.2f} / {r['test_pA_plus']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=64, help="max training pairs per behaviour")
    parser.add_argument("--validation", type=int, default=24)
    parser.add_argument("--layers", default="8,14,20")
    parser.add_argument("--fractions", default="-0.1,0.1")
    parser.add_argument("--behaviours", default=",".join(CAA_BEHAVIOURS))
    parser.add_argument(
        "--fetch", action="store_true", help="download the pinned upstream files instead of ../shared"
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "caa_behaviours"))
    args = parser.parse_args()
    lm = steerlab.load_model()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done_path = out.with_suffix(".json")
    results = json.loads(done_path.read_text()) if done_path.exists() else []  # resume after an interruption
    done = {r["behaviour"] for r in results}
    for behaviour in args.behaviours.split(","):
        if behaviour in done:
            continue
        start = time.perf_counter()
        result, _ = run_behaviour(lm, behaviour, args)
        result["seconds"] = time.perf_counter() - start
        results.append(result)
        atomic_write_text(done_path, json.dumps(results, indent=2))
        print(
            f"{behaviour}: layer {result['layer']} effect {result['test_effect']:+.3f} "
            f"CI {result['test_effect_ci']} ({result['seconds']:.0f} s)",
            flush=True,
        )
    plot(results, out.with_suffix(".png"))
    print(markdown(results))
    print(json.dumps({r["behaviour"]: round(r["test_effect"], 4) for r in results}))


if __name__ == "__main__":
    main()
