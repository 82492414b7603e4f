"""The end-to-end demo: a sentiment steering vector on the embedded model, chosen on validation,
reported on test, with controls, side effects, generations and an HTML report.

Everything it needs ships with steerlab (built-in datasets written for the project), so it runs offline.
Other paired texts, prompts and word lists (e.g. from an experiment file) run through the same recipe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steerlab.data import PairedTexts, PromptSet, load_builtin
from steerlab.data.sources import DataRef, load_dataset, load_word_lists
from steerlab.errors import UserError
from steerlab.evaluate import bootstrap_ci, generate, prepare_neutral, separability
from steerlab.hooks import Positions
from steerlab.io import check_output_folder, write_json
from steerlab.models import LoadedModel
from steerlab.options import ModelArgs
from steerlab.steering import extract_mean_difference
from steerlab.steering.extract import text_read_spec
from steerlab.steering.metrics import behaviour_metric
from steerlab.steering.sweep import Grid, choose_setting, sweep, write_csv

DEFAULT_LAYERS = (6, 8, 10, 12, 14, 16, 18, 20)
DEFAULT_FRACTIONS = (-0.1, -0.07, -0.04, 0.04, 0.07, 0.1)
SENTIMENT = "sentiment (p of a positive vs negative next word on neutral sentence starts)"
SENTIMENT_SOURCES = ("builtin:sentiment", "builtin:sentiment-prompts", "builtin:sentiment-words")


def _source(data: DataRef | str | dict) -> object:
    """What a data field names (a spec string, path or dataset), whether given bare or as a DataRef."""
    return data.source if isinstance(data, DataRef) else data


@dataclass
class DemoConfig(ModelArgs):
    """The demo's recipe and data; the model options (model, device, dtype, progress) are `ModelArgs`'."""

    layers: tuple[int, ...] = DEFAULT_LAYERS
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    positions: str = "all"
    max_perplexity_increase: float = 0.2
    n_generations: int = 4
    max_new_tokens: int = 32
    seed: int = 0
    extra: dict = field(default_factory=dict)
    pairs: DataRef | str = "builtin:sentiment"
    prompts: DataRef | str = "builtin:sentiment-prompts"
    words: dict[str, list[str]] | str = "builtin:sentiment-words"

    def behaviour(self, pairs: PairedTexts, prompts: PromptSet, words: dict[str, list[str]]) -> str:
        """What the demo measures, in words (the built-in sentiment data however it was named)."""
        pairs_source, prompts_source, words_source = SENTIMENT_SOURCES
        builtin_words = _source(self.words) == words_source or words == load_word_lists(words_source, "words")
        if (_source(self.pairs), _source(self.prompts)) == (pairs_source, prompts_source) and builtin_words:
            return SENTIMENT
        return f"{pairs.name} (p of a positive vs negative next word on {prompts.name})"


def run_demo(out_dir: str | Path, config: DemoConfig | None = None, lm: LoadedModel | None = None) -> dict:
    """Run the whole demo, write its files into `out_dir` and return the summary dict.

    The data and `out_dir` (the `--out` folder) are checked before the model loads."""
    config = config or DemoConfig()
    out = check_output_folder(out_dir, "--out")
    pairs = load_dataset(config.pairs, (PairedTexts,), "contrast", "the demo")
    prompts = load_dataset(config.prompts, (PromptSet,), "evaluation", "the demo")
    words = config.words if isinstance(config.words, dict) else load_word_lists(config.words, "words")
    positions = Positions.parse(config.positions)
    pairs_train, pairs_heldout = pairs.split([0.75, 0.25], seed=config.seed)
    prompts_val, prompts_test = prompts.split([0.5, 0.5], seed=config.seed)
    if not len(pairs_heldout) or not len(prompts_val) or not len(prompts_test):
        raise UserError(
            f"the demo holds out a quarter of the pairs and halves the prompts; {pairs.name} has "
            f"{len(pairs)} pairs and {prompts.name} {len(prompts)} prompts (give at least 4 and 2)"
        )
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lm = lm or config.load()
    vector = extract_mean_difference(lm, pairs_train, config.layers, read="last", progress=config.progress)
    vector.save(out / "vector")

    heldout_pos = [text_read_spec(lm, t, "last", None, False) for t in pairs_heldout.positive]
    heldout_neg = [text_read_spec(lm, t, "last", None, False) for t in pairs_heldout.negative]
    auroc = separability(lm, heldout_pos, heldout_neg, vector.vectors)

    neutral = prepare_neutral(lm, load_builtin("neutral-text"))
    val_metric = behaviour_metric(lm, prompts_val, words)
    test_metric = behaviour_metric(lm, prompts_test, words)
    grid = Grid(config.layers, config.fractions)
    rows = sweep(
        lm,
        vector,
        val_metric,
        grid,
        split="validation",
        positions=positions,
        neutral=neutral,
        seed=config.seed,
        progress=config.progress,
    )
    choice = choose_setting(rows, config.max_perplexity_increase)
    rows += sweep(
        lm,
        vector,
        test_metric,
        Grid([choice.layer], config.fractions),
        split="test",
        positions=positions,
        neutral=neutral,
        seed=config.seed,
        progress=config.progress,
    )
    for row in rows:
        row["auroc"] = auroc[row["layer"]]
    write_csv(rows, out / "sweep.csv")

    layer, m = choice.layer, vector.multiplier_for_fraction(choice.layer, choice.fraction)
    # The test sweep already scored every setting at the chosen layer: reuse its per-prompt scores.
    at = {(r["vector"], r["fraction"]): r for r in rows if r["split"] == "test"}
    f = choice.fraction
    plus, minus, base = at["steering", f], at["steering", -f], at["none", 0.0]
    diff = (plus["item_scores"] - minus["item_scores"]).numpy()
    effect, low, high = bootstrap_ci(diff, seed=config.seed)
    random_shift = max(abs(at["random", sign * f]["score"] - base["score"]) for sign in (1, -1))
    curve = sorted((r["fraction"], r["score"]) for r in at.values() if r["vector"] in ("steering", "none"))
    monotone = bool(np.all(np.diff([s for _, s in curve]) >= -1e-9))
    ppl_rise = max(plus["perplexity"], minus["perplexity"]) / base["perplexity"] - 1

    gen_prompts = prompts_test.prompts[: config.n_generations]
    generations = {
        "prompt": gen_prompts,
        "unsteered": generate(lm, gen_prompts, chat=False, max_new_tokens=config.max_new_tokens),
    }
    for name, mult in (("minus", -m), ("plus", m)):
        with vector.apply(lm, layer=layer, multiplier=mult, positions=positions):
            generations[name] = generate(lm, gen_prompts, chat=False, max_new_tokens=config.max_new_tokens)
    generation_rows = [
        {"prompt": p, "minus": a, "unsteered": b, "plus": c}
        for p, a, b, c in zip(
            gen_prompts, generations["minus"], generations["unsteered"], generations["plus"]
        )
    ]
    write_json(out / "generations.json", generation_rows)

    residual = vector.residual_norm(layer)
    summary = {
        "model": lm.info.name,
        "behaviour": config.behaviour(pairs, prompts, words),
        "layer": layer,
        "fraction_of_residual_norm": choice.fraction,
        "multiplier": m,
        "vector_norm": vector.norm(layer),
        "residual_norm": residual,
        "added_norm_over_residual": abs(m) * vector.norm(layer) / residual,
        "validation_effect": choice.effect,
        "test_p_base": base["score"],
        "test_p_minus": minus["score"],
        "test_p_plus": plus["score"],
        "test_effect": effect,
        "test_effect_ci": [low, high],
        "test_monotone": monotone,
        "random_control_max_shift": random_shift,
        "perplexity_base": base["perplexity"],
        "perplexity_rise": ppl_rise,
        "kl_plus": plus["kl"],
        "kl_minus": minus["kl"],
        "auroc": auroc[layer],
        "n_pairs_train": len(pairs_train.positive),
        "n_prompts_validation": len(prompts_val.prompts),
        "n_prompts_test": len(prompts_test.prompts),
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "summary.json", summary)
    from steerlab.steering.report import demo_report

    demo_report(out, summary, rows, generation_rows, vector.metadata)
    return summary
