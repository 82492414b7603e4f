"""Steering against trained interventions at the same layer, on held-out test items.

Per layer: the mean-difference (CAA) vector of the training data (paired texts: last token; A/B items:
CAA at the answer letter, letters balanced; a target model's replies: last token of prompt + its reply
against prompt + the base model's reply) at a fixed fraction of the residual norm and at the norm of
the learned bias; the bias vector; LoRA; the trained methods once per seed. Each is scored on the test
items against the unsteered model (per-item shift, bootstrap 95% CI) with its side effects on neutral
text and, where given, the accuracy on capability A/B items (MMLU).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from steerlab.data import ABDataset, PairedTexts, PromptSet
from steerlab.evaluate import ABPrompts, NeutralText, bootstrap_ci, side_effects
from steerlab.evaluate.capability import capability
from steerlab.evaluate.generation import generate
from steerlab.evaluate.judges import refusal_score
from steerlab.finetune.train import Replies, TrainConfig, TrainingData, train_bias, train_lora, train_mlp
from steerlab.hooks import Positions, add
from steerlab.models import LoadedModel
from steerlab.steering import SteeringVector, extract_caa, extract_mean_difference
from steerlab.steering.metrics import Metric

COLUMNS = [
    "layer",
    "method",
    "seed",
    "effect",
    "ci_low",
    "ci_high",
    "score",
    "kl",
    "perplexity",
    "capability",
    "control",
    "added_norm",
    "trainable_params",
    "train_seconds",
    "steps",
    "tokens",
    "cos_with_caa",
]


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The unsteered model's per-item test scores, neutral-text perplexity, capability accuracy and mean
    control score (where the metric has one)."""

    scores: torch.Tensor
    perplexity: float
    capability: float | None
    control: float | None = None


@torch.no_grad()
def _measure(
    lm: LoadedModel, metric: Metric, neutral: NeutralText, capability_items: ABPrompts | None
) -> tuple[torch.Tensor, float, float, float | None, float | None]:
    """(per-item scores, KL, perplexity, capability accuracy or None, mean control score or None) under
    the hooks in place."""
    measured = metric(lm)
    scores = measured["score"].double().cpu()
    control = float(measured["control"].double().mean()) if "control" in measured else None
    effects = side_effects(lm, neutral)
    accuracy = None if capability_items is None else capability(lm, capability_items).accuracy
    return scores, effects.kl, effects.perplexity, accuracy, control


def measure_baseline(
    lm: LoadedModel, metric: Metric, neutral: NeutralText, capability_items: ABPrompts | None = None
) -> Baseline:
    """The unsteered measurements every row is compared with (computed once for all layers)."""
    scores, _, perplexity, accuracy, control = _measure(lm, metric, neutral, capability_items)
    return Baseline(scores, perplexity, accuracy, control)


def refusal_metric(prompts: Sequence[str], control_prompts: Sequence[str] = ()) -> Metric:
    """ "score": per prompt, P(a refusal start) / (P(refusal start) + P(compliance start)) of the chat reply
    (the sigmoid of `refusal_score`); "control": the same on harmless `control_prompts` (false refusals)."""

    def metric(lm: LoadedModel) -> dict[str, torch.Tensor]:
        out = {"score": torch.sigmoid(torch.tensor(refusal_score(lm, list(prompts)), dtype=torch.float64))}
        if control_prompts:
            control = refusal_score(lm, list(control_prompts))
            out["control"] = torch.sigmoid(torch.tensor(control, dtype=torch.float64))
        return out

    return metric


def target_replies(
    base: LoadedModel,
    target: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    progress: bool = True,
) -> Replies:
    """The greedy chat replies of `target` (e.g. a model organism) and of `base` to `prompts`."""
    replies = generate(target, list(prompts), max_new_tokens=max_new_tokens, batch_size=16, progress=progress)
    base_replies = generate(
        base, list(prompts), max_new_tokens=max_new_tokens, batch_size=16, progress=progress
    )
    return Replies(list(prompts), replies, base_replies, target.info.name)


def split_like_demo(
    pairs: PairedTexts, prompts: PromptSet, seed: int
) -> tuple[PairedTexts, PromptSet, PromptSet]:
    """(training pairs, validation prompts, test prompts), cut exactly as `steerlab demo` cuts them."""
    pairs_train, _ = pairs.split([0.75, 0.25], seed=seed)
    prompts_val, prompts_test = prompts.split([0.5, 0.5], seed=seed)
    return pairs_train, prompts_val, prompts_test


def _row(
    lm: LoadedModel,
    metric: Metric,
    neutral: NeutralText,
    capability_items: ABPrompts | None,
    base: Baseline,
    context: Callable[[], AbstractContextManager],
    boot_seed: int,
    **fields,
) -> dict:
    with context():
        scores, kl, perplexity, accuracy, control = _measure(lm, metric, neutral, capability_items)
    effect, low, high = bootstrap_ci((scores - base.scores).numpy(), seed=boot_seed)
    return {
        **fields,
        "effect": effect,
        "ci_low": low,
        "ci_high": high,
        "score": float(scores.mean()),
        "kl": kl,
        "perplexity": perplexity,
        "capability": accuracy,
        "control": control,
    }


def caa_vector(lm: LoadedModel, data: TrainingData, layer: int, seed: int, progress: bool) -> SteeringVector:
    """The mean-difference vector of the training data: CAA at the answer letter (A/B items, letters
    balanced with `seed`) or the last token of paired texts (for replies: prompt + target reply against
    prompt + base reply)."""
    if isinstance(data, ABDataset):
        return extract_caa(lm, data, [layer], seed=seed, progress=progress)
    if isinstance(data, Replies):
        data = data.as_pairs(lm.tokenizer)
    return extract_mean_difference(lm, data, [layer], read="last", progress=progress)


def compare_layer(
    lm: LoadedModel,
    train_data: TrainingData,
    metric: Metric,
    neutral: NeutralText,
    config: TrainConfig,
    *,
    rank: int = 4,
    target: str = "both",
    caa_fraction: float = 0.1,
    positions: Positions | None = None,
    progress: bool = True,
    seeds: Sequence[int] | None = None,
    capability_items: ABPrompts | None = None,
    baseline: Baseline | None = None,
    full_mlp: bool = False,
) -> tuple[list[dict], dict]:
    """The comparison rows at `config.layer` (`metric`: per-item behaviour scores on the test split, e.g.
    `behaviour_metric` of the test prompts or A/B items) and the results {"caa": vector, "bias-seedS": ...,
    "lora-seedS": ..., "mlp-seedS": ...}. The trained methods (and the norm-matched CAA row) run once per
    seed of `seeds` (default: `config.seed`); CAA is extracted with `config.seed`. `full_mlp`: also
    fine-tune all of block L's MLP (the upper bound)."""
    layer = config.layer
    seeds = list(seeds) if seeds is not None else [config.seed]
    base = baseline or measure_baseline(lm, metric, neutral, capability_items)
    measure = (lm, metric, neutral, capability_items, base)
    rows = [
        {
            "layer": layer,
            "method": "unsteered",
            "effect": 0.0,
            "ci_low": 0.0,
            "ci_high": 0.0,
            "score": float(base.scores.mean()),
            "kl": 0.0,
            "perplexity": base.perplexity,
            "capability": base.capability,
            "control": base.control,
            "trainable_params": 0,
        }
    ]

    started = time.perf_counter()
    vector = caa_vector(lm, train_data, layer, config.seed, progress)
    caa_seconds = time.perf_counter() - started
    caa = vector.vectors[layer].float().to(lm.device)
    delta = caa * vector.multiplier_for_fraction(layer, caa_fraction)
    rows.append(
        _row(
            *measure, lambda: add(lm, {layer: delta}, positions), config.seed,
            layer=layer, method=f"caa@{caa_fraction:g}", added_norm=float(delta.norm()), trainable_params=0,
            train_seconds=caa_seconds, cos_with_caa=1.0,
        )
    )  # fmt: skip
    results: dict = {"caa": vector}
    for seed in seeds:
        seeded = dataclasses.replace(config, seed=seed)
        budget = {"seed": seed, "steps": config.steps}
        bias = train_bias(lm, train_data, seeded, positions=positions, progress=progress)
        b = bias.tensors["bias"].to(lm.device)
        cos = float(torch.nn.functional.cosine_similarity(b, caa, dim=0))
        matched = caa * float(b.norm() / caa.norm())
        rows.append(
            _row(
                *measure, lambda d=matched: add(lm, {layer: d}, positions), seed,
                layer=layer, method="caa@|bias|", seed=seed, added_norm=float(matched.norm()), trainable_params=0,
                train_seconds=caa_seconds, cos_with_caa=1.0,
            )
        )  # fmt: skip
        rows.append(
            _row(
                *measure, lambda b=b: add(lm, {layer: b}, positions), seed,
                layer=layer, method="bias", added_norm=float(b.norm()), trainable_params=bias.trainable_params,
                train_seconds=bias.seconds, tokens=bias.tokens_seen, cos_with_caa=cos, **budget,
            )
        )  # fmt: skip
        lora, tuned = train_lora(lm, train_data, seeded, rank=rank, target=target, progress=progress)
        rows.append(
            _row(
                tuned, *measure[1:], nullcontext, seed,
                layer=layer, method=f"lora-r{rank}-{target}", trainable_params=lora.trainable_params,
                train_seconds=lora.seconds, tokens=lora.tokens_seen, **budget,
            )
        )  # fmt: skip
        del tuned
        gc.collect()
        results[f"bias-seed{seed}"], results[f"lora-seed{seed}"] = bias, lora
        if full_mlp:
            full, tuned = train_mlp(lm, train_data, seeded, progress=progress)
            rows.append(
                _row(
                    tuned, *measure[1:], nullcontext, seed,
                    layer=layer, method="mlp-full", trainable_params=full.trainable_params,
                    train_seconds=full.seconds, tokens=full.tokens_seen, **budget,
                )
            )  # fmt: skip
            del tuned
            gc.collect()
            results[f"mlp-seed{seed}"] = full
    return rows, results
