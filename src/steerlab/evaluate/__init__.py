"""Measuring behaviour: answer probabilities, word preference, side effects, generation, statistics."""

from steerlab.evaluate.generation import generate
from steerlab.evaluate.probability import (
    ABPrompts,
    ABScores,
    WordPreference,
    ab_scores,
    last_token_logprobs,
    prepare_ab,
    prepare_word_preference,
    word_preference,
)
from steerlab.evaluate.separability import projections, separability
from steerlab.evaluate.side_effects import NeutralText, SideEffects, prepare_neutral, side_effects
from steerlab.evaluate.stats import auroc, bootstrap_ci

__all__ = [
    "ABPrompts",
    "ABScores",
    "NeutralText",
    "SideEffects",
    "WordPreference",
    "ab_scores",
    "auroc",
    "bootstrap_ci",
    "generate",
    "last_token_logprobs",
    "prepare_ab",
    "prepare_neutral",
    "prepare_word_preference",
    "projections",
    "separability",
    "side_effects",
    "word_preference",
]
