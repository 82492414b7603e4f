"""Soft metrics of generated text: BERTScore, sentence-embedding similarity, keyword counts, passage perplexity."""

from steerlab.evaluate.soft.bertscore import BERTScore, bert_score, idf_weights, read_baseline
from steerlab.evaluate.soft.embeddings import embedding_similarity, sentence_embeddings, similarity_matrix
from steerlab.evaluate.soft.keywords import KeywordCounts, keyword_counts
from steerlab.evaluate.soft.perplexity import PassagePerplexity, model_context_length, passage_perplexity

__all__ = [
    "BERTScore",
    "KeywordCounts",
    "PassagePerplexity",
    "bert_score",
    "embedding_similarity",
    "idf_weights",
    "keyword_counts",
    "model_context_length",
    "passage_perplexity",
    "read_baseline",
    "sentence_embeddings",
    "similarity_matrix",
]
