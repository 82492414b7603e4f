"""Measuring behaviour: answer probabilities, word preference, side effects, generation, refusal judges,
statistics."""

from steerlab.evaluate.generation import generate
from steerlab.evaluate.judges import (
    Judge,
    JudgeError,
    ModelJudge,
    PhraseJudge,
    is_refusal,
    load_judge,
    refusal_rate,
    refusal_score,
)
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
    "Judge",
    "JudgeError",
    "ModelJudge",
    "NeutralText",
    "PhraseJudge",
    "SideEffects",
    "WordPreference",
    "ab_scores",
    "auroc",
    "bootstrap_ci",
    "generate",
    "is_refusal",
    "last_token_logprobs",
    "load_judge",
    "prepare_ab",
    "prepare_neutral",
    "prepare_word_preference",
    "projections",
    "refusal_rate",
    "refusal_score",
    "separability",
    "side_effects",
    "word_preference",
]
