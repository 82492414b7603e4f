"""Behaviour metrics for steering: p(matching answer) on A/B items, word preference on prompts, and the
unsteered / -m / +m comparison that `steerlab evaluate` prints."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from steerlab.data import ABDataset, PromptSet
from steerlab.errors import UserError
from steerlab.evaluate import (
    NeutralText,
    ab_scores,
    bootstrap_ci,
    prepare_ab,
    prepare_word_preference,
    side_effects,
    word_preference,
)
from steerlab.hooks import Positions
from steerlab.models import LoadedModel
from steerlab.steering.vector import SteeringVector

log = logging.getLogger(__name__)

Metric = Callable[[LoadedModel], dict[str, torch.Tensor]]
"""Per-item scores under the hooks currently in place; key "score" is the behaviour metric."""


def behaviour_metric(
    lm: LoadedModel,
    dataset: ABDataset | PromptSet,
    words: dict[str, list[str]] | None = None,
    system_prompt: str | None = None,
    progress: bool = False,
) -> Metric:
    """The behaviour metric for `dataset`, prepared (tokenised) once.

    A/B items: "score" = p(matching answer), "p_first" = p(first option), normalised over the offered
    letters, and "chance" = 1 / (number of options). Prompts: "score" = p(positive) from the next-token mass of `words["positive"]` against
    `words["negative"]` (required for prompts).
    """
    if isinstance(dataset, ABDataset):
        prepared = prepare_ab(lm, dataset, system_prompt=system_prompt)

        def ab_metric(model: LoadedModel) -> dict[str, torch.Tensor]:
            scores = ab_scores(model, prepared, progress=progress)
            return {"score": scores.p_matching, "p_first": scores.p_first, "chance": scores.chance}

        return ab_metric
    if isinstance(dataset, PromptSet):
        if words is None:
            raise UserError(
                "word preference on prompts needs word lists {'positive': [...], 'negative': [...]}"
            )
        words_prepared = prepare_word_preference(lm, dataset.prompts, words["positive"], words["negative"])
        return lambda model: {"score": word_preference(model, words_prepared, progress=progress)}
    raise UserError(
        f"a behaviour metric needs A/B items or prompts, got {type(dataset).__name__} "
        "(paired texts are for extraction)"
    )


def summarise(scores: dict[str, torch.Tensor], seed: int = 0) -> dict:
    """Mean score with its bootstrap 95% CI, and the means of p(first option) and chance where given."""
    mean, low, high = bootstrap_ci(scores["score"].double().cpu().numpy(), seed=seed)
    out = {"score": mean, "ci": [low, high], "n_items": int(scores["score"].numel())}
    for key in ("p_first", "chance"):
        if key in scores:
            out[key] = float(scores[key].double().mean())
    return out


@torch.no_grad()
def compare(
    lm: LoadedModel,
    vector: SteeringVector,
    metric: Metric,
    layer: int,
    multiplier: float,
    *,
    neutral: NeutralText | None = None,
    positions: Positions | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """The metric (and side effects on `neutral`) unsteered, at -multiplier and at +multiplier."""
    results = {}
    settings = (("unsteered", 0.0), ("-m", -multiplier), ("+m", multiplier))
    for name, mult in tqdm(settings, desc="evaluating", disable=not progress, unit="setting"):
        log.info("scoring %s (layer %d, multiplier %.4g)", name, layer, mult)
        with vector.apply(lm, layer=layer, multiplier=mult, positions=positions):
            row = summarise(metric(lm))
            if neutral is not None:
                effects = side_effects(lm, neutral)
                row.update(perplexity=effects.perplexity, kl=effects.kl)
        results[name] = row
    return results
