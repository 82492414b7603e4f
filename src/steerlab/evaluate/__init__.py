"""Measuring behaviour: answer probabilities, word preference, side effects (perplexity/KL, capability on
MMLU/TruthfulQA), generation, soft metrics of text (BERTScore, embedding similarity), refusal judges,
statistics."""

from steerlab.evaluate.capability import CapabilityResult, evaluate_capability, load_benchmark
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
    prepare_cloze,
    prepare_word_preference,
    word_preference,
)
from steerlab.evaluate.separability import projections, separability
from steerlab.evaluate.side_effects import NeutralText, SideEffects, prepare_neutral, side_effects
from steerlab.evaluate.soft import (
    BERTScore,
    KeywordCounts,
    PassagePerplexity,
    bert_score,
    embedding_similarity,
    idf_weights,
    keyword_counts,
    passage_perplexity,
    sentence_embeddings,
    similarity_matrix,
)
from steerlab.evaluate.stats import auroc, bootstrap_ci

__all__ = [
    "ABPrompts",
    "ABScores",
    "BERTScore",
    "CapabilityResult",
    "KeywordCounts",
    "NeutralText",
    "PassagePerplexity",
    "Judge",
    "JudgeError",
    "ModelJudge",
    "NeutralText",
    "PhraseJudge",
    "SideEffects",
    "WordPreference",
    "ab_scores",
    "auroc",
    "bert_score",
    "bootstrap_ci",
    "embedding_similarity",
    "evaluate_capability",
    "generate",
    "idf_weights",
    "keyword_counts",
    "last_token_logprobs",
    "load_benchmark",
    "passage_perplexity",
    "is_refusal",
    "last_token_logprobs",
    "load_judge",
    "prepare_ab",
    "prepare_cloze",
    "prepare_neutral",
    "prepare_word_preference",
    "projections",
    "sentence_embeddings",
    "refusal_rate",
    "refusal_score",
    "separability",
    "side_effects",
    "similarity_matrix",
    "word_preference",
]
