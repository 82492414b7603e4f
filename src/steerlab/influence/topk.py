"""Running top-k / bottom-k per query over a stream of score batches, and TF-IDF candidate prefiltering."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["merge_topk", "tfidf_candidates", "topk_recall", "update_topk"]


def update_topk(state: dict[str, torch.Tensor], scores: torch.Tensor, index: torch.Tensor, k: int) -> None:
    """Fold a [Q, B] batch of scores (NaN = not a candidate) for training indices `index` [B] into
    `state` (`top_values`, `top_index`, `bottom_values`, `bottom_index`, each [Q, <=k])."""
    scores = scores.double()
    q = scores.shape[0]
    idx = index.to(torch.long).expand(q, -1)
    for which, sign in (("top", 1.0), ("bottom", -1.0)):
        vals = torch.nan_to_num(sign * scores, nan=-float("inf"))
        if f"{which}_values" in state:
            vals = torch.cat([sign * state[f"{which}_values"], vals], 1)
            idx_all = torch.cat([state[f"{which}_index"], idx], 1)
        else:
            idx_all = idx
        best, pos = vals.topk(min(k, vals.shape[1]), dim=1, sorted=True)
        state[f"{which}_values"] = sign * best
        state[f"{which}_index"] = idx_all.gather(1, pos)


def merge_topk(states: Sequence[dict[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
    """Merge running top-k states of disjoint shards (order of the shards does not matter for values)."""
    out: dict[str, torch.Tensor] = {}
    for which, sign in (("top", 1.0), ("bottom", -1.0)):
        vals = torch.cat([sign * s[f"{which}_values"] for s in states], 1)
        idx = torch.cat([s[f"{which}_index"] for s in states], 1)
        # sort by (value desc, index asc) so the merge is independent of the shard order
        order = np.lexsort((idx.numpy(), -vals.numpy()), axis=1)[:, :k]
        order_t = torch.from_numpy(order)
        out[f"{which}_values"] = sign * vals.gather(1, order_t)
        out[f"{which}_index"] = idx.gather(1, order_t)
    return out


def _tfidf(docs: Sequence[Sequence[int]], vocab: int, idf: np.ndarray | None = None):
    from scipy import sparse

    rows = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)]) if docs else np.zeros(0, int)
    cols = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if docs else np.zeros(0, int)
    counts = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(docs), vocab))
    counts.sum_duplicates()
    if idf is None:
        df = np.bincount(counts.indices, minlength=vocab)
        idf = np.log((1 + len(docs)) / (1 + df)) + 1.0
    tf = counts.multiply(idf[None, :]).tocsr()
    norms = np.sqrt(np.asarray(tf.multiply(tf).sum(1))).ravel() + 1e-12
    return sparse.diags(1 / norms) @ tf, idf


def tfidf_candidates(
    queries: Sequence[Sequence[int]], train: Sequence[Sequence[int]], keep: int, vocab: int | None = None
) -> torch.Tensor:
    """[Q, keep] indices of the training documents with the highest TF-IDF cosine similarity (token ids as
    words, sublinear-free counts, smoothed idf fitted on the training documents) to each query."""
    vocab = vocab or 1 + max(
        max((max(d) for d in train if len(d)), default=0), max((max(d) for d in queries if len(d)), default=0)
    )
    t, idf = _tfidf(train, vocab)
    q, _ = _tfidf(queries, vocab, idf)
    sims = torch.from_numpy((q @ t.T).toarray())
    keep = min(keep, len(train))
    # stable: ties broken by the lower index
    order = np.lexsort((np.broadcast_to(np.arange(len(train)), sims.shape), -sims.numpy()), axis=1)[:, :keep]
    return torch.from_numpy(np.ascontiguousarray(order))


def topk_recall(candidates: torch.Tensor, reference_top: torch.Tensor) -> float:
    """Mean over queries of |candidates ∩ reference top-k| / k."""
    hits = [len(set(c.tolist()) & set(r.tolist())) / len(r) for c, r in zip(candidates, reference_top)]
    return float(np.mean(hits))
