"""Soft metrics of generated text: BERTScore, sentence-embedding similarity, keyword counts, passage perplexity."""

from steerlab.evaluate.soft.bertscore import BERTScore, bert_score, idf_weights, read_baseline
from steerlab.evaluate.soft.embeddings import embedding_similarity, sentence_embeddings, similarity_matrix

__all__ = [
    "BERTScore",
    "bert_score",
    "embedding_similarity",
    "idf_weights",
    "read_baseline",
    "sentence_embeddings",
    "similarity_matrix",
]
