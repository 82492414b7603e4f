"""Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2, and their cosines.

Each text is stripped, encoded with its special tokens and truncated to the encoder's `max_length`
(sentence-transformers' `max_seq_length`, 256 for all-MiniLM-L6-v2); the last hidden states are averaged
over the attention mask (special tokens included) and L2-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steerlab.errors import UserError
from steerlab.models.encoders import DEFAULT_ENCODER, Encoder, get_encoder


def _encode(encoder: Encoder, text: str) -> list[int]:
    return list(
        encoder.tokenizer(
            text.strip(), add_special_tokens=True, max_length=encoder.max_length, truncation=True
        )["input_ids"]
    )


def sentence_embeddings(
    texts: Sequence[str],
    encoder: Encoder | str = DEFAULT_ENCODER,
    batch_size: int = 64,
    normalize: bool = True,
) -> torch.Tensor:
    """(N, width) float32 mean-pooled last-layer embeddings of `texts`, L2-normalised unless told not to."""
    if isinstance(texts, str):
        raise UserError("sentence_embeddings: expected a list of texts, got one string")
    if not texts:
        raise UserError("sentence_embeddings: no texts given")
    encoder = get_encoder(encoder)
    states = encoder.hidden_states([_encode(encoder, t) for t in texts], None, batch_size)
    pooled = torch.stack([h.mean(dim=0) for h in states])
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled


def embedding_similarity(
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    encoder: Encoder | str = DEFAULT_ENCODER,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N,) cosine similarity of the sentence embeddings of `texts_a[i]` and `texts_b[i]`."""
    if len(texts_a) != len(texts_b):
        raise UserError(f"embedding_similarity: {len(texts_a)} texts against {len(texts_b)}")
    emb = sentence_embeddings([*texts_a, *texts_b], encoder, batch_size)
    return (emb[: len(texts_a)] * emb[len(texts_a) :]).sum(-1)


def similarity_matrix(
    texts_a: Sequence[str],
    texts_b: Sequence[str] | None = None,
    encoder: Encoder | str = DEFAULT_ENCODER,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N, M) cosine similarities between every text of `texts_a` and of `texts_b` (default: `texts_a`)."""
    a = sentence_embeddings(texts_a, encoder, batch_size)
    b = a if texts_b is None else sentence_embeddings(texts_b, encoder, batch_size)
    return a @ b.T
