"""Steering vs trained interventions on the embedded SmolLM2, at several layers, with equal training budgets
(steps, items per step, learning rate, seeds), on two behaviours:

- the built-in sentiment contrast (the demo's splits; metric: p(positive next word) on the test prompts;
  loss: the NLL of the positive texts);
- one CAA A/B behaviour (train: `--train-limit` items of ../shared/data/caa/<behaviour>/generate.json,
  letters balanced; test: its test_ab.json; metric: p(matching answer); loss: -log p(matching letter));
- the refusal organism as a target model (task `organism`; train: the organism's and the base model's
  24-token greedy replies to `--organism-train` harmful + as many harmless train prompts of
  ../shared/data/redteam/refusal_direction; loss: NLL of the organism's replies; metric: P(refusal start)
  against compliance starts on `--organism-test` harmful test prompts; control: the same on as many
  harmless test prompts, i.e. false refusals).

Per layer: the mean-difference (CAA) vector at 0.1 of the residual norm and at the learned bias's norm,
the trained bias vector and LoRA (each trained method once per seed), with KL and perplexity on neutral
text and accuracy on `--capability-limit` MMLU A/B items. Effects are mean per-item shifts with bootstrap
95% CIs; the trained methods' effects are also printed as ratios to CAA's at 0.1 of the residual norm,
measured in the same run. Each task resumes after its last finished layer. The last line is one JSON
object: the keys of the first sentiment layer (effect_caa, effect_bias, effect_lora, cos_bias_caa,
params_bias, params_lora, ...) and the same keys suffixed with `_ab` for the A/B behaviour and
`_organism` for the organism (with control_*), plus per-layer means in "layers_sentiment" / "layers_ab" /
"layers_organism".

    .venv/bin/python benchmarks/compare.py [--layers 15] [--ab-layers 15] [--steps 30] [--repeats 1]
        [--behaviour corrigible-neutral-HHH] [--tasks sentiment,ab] [--out results/compare]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerlab.finetune.commands import CompareArgs, run_compare
from steerlab.finetune.report import SUMMARY_COLUMNS, aggregate, markdown_table

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "caa"


def keys(result: dict, suffix: str = "") -> dict:
    """The summary keys of the first layer (means over seeds), each name followed by `suffix`."""
    merged = aggregate(result["rows"])
    first = result["layers"][0]
    by = {r["method"]: r for r in merged if r["layer"] == first}
    lora = next(r for m, r in by.items() if m.startswith("lora"))
    caa, bias = by["caa@0.1"], by["bias"]
    for name, row in (("bias", bias), ("lora", lora), ("caa@|bias|", by["caa@|bias|"])):
        ratio = row["effect"] / caa["effect"] if caa["effect"] else float("nan")
        print(f"{suffix or 'sentiment'} layer {first}: effect {name} / effect caa@0.1 = {ratio:.3g}")
    out = {
        "layer": first,
        "effect_caa": caa["effect"],
        "effect_caa_ci": [caa["ci_low"], caa["ci_high"]],
        "effect_caa_norm_matched": by["caa@|bias|"]["effect"],
        "effect_bias": bias["effect"],
        "effect_bias_spread": bias["effect_spread"],
        "effect_bias_ci": [bias["ci_low"], bias["ci_high"]],
        "effect_lora": lora["effect"],
        "effect_lora_spread": lora["effect_spread"],
        "effect_lora_ci": [lora["ci_low"], lora["ci_high"]],
        "cos_bias_caa": bias["cos_with_caa"],
        "params_bias": bias["trainable_params"],
        "params_lora": lora["trainable_params"],
        "kl_caa": caa["kl"],
        "kl_bias": bias["kl"],
        "kl_lora": lora["kl"],
        "ppl_base": by["unsteered"]["perplexity"],
        "ppl_caa": caa["perplexity"],
        "ppl_bias": bias["perplexity"],
        "ppl_lora": lora["perplexity"],
        "mmlu_base": by["unsteered"]["capability"],
        "mmlu_caa": caa["capability"],
        "mmlu_bias": bias["capability"],
        "mmlu_lora": lora["capability"],
        "seconds_bias": bias["train_seconds"],
        "seconds_lora": lora["train_seconds"],
        "seconds_caa": caa["train_seconds"],
        "tokens_bias": bias["tokens"],
        "tokens_lora": lora["tokens"],
    }
    if by["unsteered"].get("control") is not None:
        out.update(
            {
                f"control_{m}": r["control"]
                for m, r in (("base", by["unsteered"]), ("caa", caa), ("bias", bias), ("lora", lora))
            }
        )
    return {k + suffix: v for k, v in out.items()}


def per_layer(result: dict) -> dict:
    """{layer: {method: [mean effect, half range over seeds, perplexity]}}."""
    table: dict = {}
    for row in aggregate(result["rows"]):
        if row["method"] != "unsteered":
            table.setdefault(str(row["layer"]), {})[row["method"]] = [
                row["effect"],
                row["effect_spread"],
                row["perplexity"],
            ]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="15", help="layers of the sentiment task")
    parser.add_argument("--ab-layers", default="15", help="layers of the A/B task")
    parser.add_argument("--organism-layers", default="15", help="layers of the organism task")
    parser.add_argument("--organism", default="smollm2-135m-refusal")
    parser.add_argument("--organism-train", type=int, default=32, help="harmful (and harmless) train prompts")
    parser.add_argument("--organism-test", type=int, default=48, help="harmful (and harmless) test prompts")
    parser.add_argument("--tasks", default="sentiment,ab")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="seeds of the trained methods")
    parser.add_argument("--behaviour", default="corrigible-neutral-HHH")
    parser.add_argument("--train-limit", type=int, default=64)
    parser.add_argument("--capability-limit", type=int, default=40, help="MMLU items; 0: none")
    parser.add_argument("--out", default="results/compare")
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    started = time.perf_counter()
    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    common = dict(
        steps=ns.steps, batch_size=ns.batch_size, lr=ns.lr, rank=ns.rank, repeats=ns.repeats,
        capability=str(SHARED / "mmlu" / "mmlu.json") if ns.capability_limit else None,
        capability_limit=ns.capability_limit or 1, progress=False,
    )  # fmt: skip
    summary: dict = {"steps": ns.steps, "batch_size": ns.batch_size, "lr": ns.lr, "rank": ns.rank,
                     "seeds": list(range(ns.repeats))}  # fmt: skip
    if "sentiment" in tasks:
        result = run_compare(CompareArgs(out=Path(ns.out) / "sentiment", layers=ns.layers, **common))
        print(markdown_table(aggregate(result["rows"]), SUMMARY_COLUMNS))
        summary.update(keys(result), layers_sentiment=per_layer(result))
    if "ab" in tasks:
        behaviour = SHARED / ns.behaviour
        result = run_compare(
            CompareArgs(
                out=Path(ns.out) / ns.behaviour, layers=ns.ab_layers, data=str(behaviour / "generate.json"),
                test_data=str(behaviour / "test_ab.json"), train_limit=ns.train_limit, **common,
            )
        )  # fmt: skip
        print(markdown_table(aggregate(result["rows"]), SUMMARY_COLUMNS))
        summary.update(keys(result, "_ab"), behaviour=ns.behaviour, layers_ab=per_layer(result))
    if "organism" in tasks:
        result = run_compare(
            CompareArgs(
                out=Path(ns.out) / ns.organism, layers=ns.organism_layers, organism=ns.organism,
                organism_data=str(SHARED.parent / "redteam" / "refusal_direction"),
                train_limit=ns.organism_train, test_limit=ns.organism_test, **common,
            )
        )  # fmt: skip
        print(markdown_table(aggregate(result["rows"]), SUMMARY_COLUMNS))
        summary.update(keys(result, "_organism"), organism=ns.organism, layers_organism=per_layer(result))
    summary["seconds_total"] = time.perf_counter() - started
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
