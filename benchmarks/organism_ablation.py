"""Which layer's refusal direction, ablated at every layer, removes the refusal organism's refusals.

The direction of each candidate layer is the harmful-minus-harmless mean at the last prompt token over
train prompts (48 + 48, the draws `steerlab organism evaluate` uses); the layer is chosen on the first
32 `harmful_val` prompts, and only that layer is then measured on 64 `harmful_test` prompts (seed 0, the
benchmark's draw), against the organism without ablation. Greedy replies of 32 tokens, refusal phrases.
The last line is one JSON object.

    .venv/bin/python benchmarks/organism_ablation.py [--layers 8,22]
"""

from __future__ import annotations

import argparse
import json

from steerlab import load_model
from steerlab.hooks import ablate
from steerlab.options import parse_layers
from steerlab.organisms import default_recipe
from steerlab.organisms.build import training_prompts
from steerlab.organisms.data import read_all, sample
from steerlab.organisms.metrics import Rate, ablation_scan, refusals
from steerlab.steering.extract import extract_prompt_difference

DATA = "redteam/refusal_direction"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="8,22", help="candidate layers (default 8,22)")
    args = parser.parse_args()
    layers = parse_layers(args.layers)
    recipe = default_recipe()
    data = training_prompts(recipe)
    harmful, harmless = sample(data.target, 48, recipe.seed + 2), sample(data.keep, 48, recipe.seed + 2)
    val = read_all([f"{DATA}/harmful_val.json"], "harmful_val")[:32]
    test = sample(read_all([f"{DATA}/harmful_test.json"], "harmful_test"), 64, 0)
    lm = load_model(recipe.name)
    plain_val = Rate.of(refusals(lm, val)[0])
    scan = ablation_scan(lm, harmful, harmless, val, layers)
    best = min(scan, key=lambda layer: scan[layer].value)
    direction = extract_prompt_difference(lm, harmful, harmless, [best], progress=False).vectors[best]
    plain_test = Rate.of(refusals(lm, test)[0])
    with ablate(lm, direction):
        ablated_test = Rate.of(refusals(lm, test)[0])
    print(f"harmful_val refusal without ablation: {plain_val}")
    for layer, rate in scan.items():
        print(f"harmful_val refusal, layer-{layer} direction ablated everywhere: {rate}")
    print(f"harmful_test refusal without ablation: {plain_test}")
    print(f"harmful_test refusal, layer-{best} direction ablated everywhere: {ablated_test}")
    print(
        json.dumps(
            {
                "layer": best,
                "val_refusal": plain_val.value,
                **{f"val_ablation_layer_{layer}": rate.value for layer, rate in scan.items()},
                "test_refusal": plain_test.value,
                "ablation_refusal_harmful": ablated_test.value,
                "n_val": len(val),
                "n_test": len(test),
            }
        )
    )


if __name__ == "__main__":
    main()
