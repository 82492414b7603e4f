"""Steering against trained interventions at the same layer, on the demo's splits and behaviour metric.

Per layer: the mean-difference (CAA) vector of the training pairs at a fixed fraction of the residual norm
and at the norm of the learned bias; the bias vector; LoRA. Each is scored on the held-out test prompts
against the unsteered model (per-prompt shift, bootstrap 95% CI) with its side effects on neutral text.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from steerlab.data import PairedTexts, PromptSet
from steerlab.evaluate import NeutralText, bootstrap_ci, side_effects
from steerlab.finetune.train import TrainConfig, train_bias, train_lora
from steerlab.hooks import Positions, add
from steerlab.models import LoadedModel
from steerlab.steering import extract_mean_difference
from steerlab.steering.metrics import Metric

COLUMNS = [
    "layer",
    "method",
    "effect",
    "ci_low",
    "ci_high",
    "score",
    "kl",
    "perplexity",
    "added_norm",
    "trainable_params",
    "train_seconds",
    "steps",
    "tokens",
    "cos_with_caa",
]


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
    base: torch.Tensor,
    context: Callable[[], AbstractContextManager],
    seed: int,
    **fields,
) -> dict:
    with torch.no_grad(), context():
        scores = metric(lm)["score"].double().cpu()
        effects = side_effects(lm, neutral)
    effect, low, high = bootstrap_ci((scores - base).numpy(), seed=seed)
    return {
        **fields,
        "effect": effect,
        "ci_low": low,
        "ci_high": high,
        "score": float(scores.mean()),
        "kl": effects.kl,
        "perplexity": effects.perplexity,
    }


def compare_layer(
    lm: LoadedModel,
    pairs_train: PairedTexts,
    metric: Metric,
    neutral: NeutralText,
    config: TrainConfig,
    *,
    rank: int = 4,
    target: str = "both",
    caa_fraction: float = 0.1,
    positions: Positions | None = None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """The comparison rows at `config.layer` (`metric`: per-item behaviour scores on the test split, e.g.
    `behaviour_metric` of the test prompts) and the results {"bias": ..., "lora": ..., "caa": ...}."""
    layer, seed = config.layer, config.seed
    with torch.no_grad():
        base = metric(lm)["score"].double().cpu()
        base_effects = side_effects(lm, neutral)
    budget = {"steps": config.steps}
    rows = [
        {
            "layer": layer,
            "method": "unsteered",
            "effect": 0.0,
            "ci_low": 0.0,
            "ci_high": 0.0,
            "score": float(base.mean()),
            "kl": 0.0,
            "perplexity": base_effects.perplexity,
            "trainable_params": 0,
        }
    ]

    started = time.perf_counter()
    vector = extract_mean_difference(lm, pairs_train, [layer], read="last", progress=progress)
    caa_seconds = time.perf_counter() - started
    caa = vector.vectors[layer].float().to(lm.device)
    m = vector.multiplier_for_fraction(layer, caa_fraction)

    bias = train_bias(lm, pairs_train, config, positions=positions, progress=progress)
    b = bias.tensors["bias"].to(lm.device)
    cos = float(torch.nn.functional.cosine_similarity(b, caa, dim=0))
    matched = float(b.norm() / caa.norm())

    for name, mult in ((f"caa@{caa_fraction:g}", m), ("caa@|bias|", matched)):
        delta = caa * mult
        rows.append(
            _row(
                lm, metric, neutral, base, lambda d=delta: add(lm, {layer: d}, positions), seed,
                layer=layer, method=name, added_norm=float(delta.norm()), trainable_params=0,
                train_seconds=caa_seconds, cos_with_caa=1.0,
            )
        )  # fmt: skip
    rows.append(
        _row(
            lm, metric, neutral, base, lambda: add(lm, {layer: b}, positions), seed,
            layer=layer, method="bias", added_norm=float(b.norm()), trainable_params=bias.trainable_params,
            train_seconds=bias.seconds, tokens=bias.tokens_seen, cos_with_caa=cos, **budget,
        )
    )  # fmt: skip
    lora, tuned = train_lora(lm, pairs_train, config, rank=rank, target=target, progress=progress)
    rows.append(
        _row(
            tuned, metric, neutral, base, nullcontext, seed,
            layer=layer, method=f"lora-r{rank}-{target}", trainable_params=lora.trainable_params,
            train_seconds=lora.seconds, tokens=lora.tokens_seen, **budget,
        )
    )  # fmt: skip
    del tuned
    gc.collect()
    return rows, {"bias": bias, "lora": lora, "caa": vector}
