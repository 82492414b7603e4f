"""How literal are a query's most influential training sequences? (Grosse et al., 2023, section 5.3:
with scale, the top-influence sequences of larger models share fewer tokens with the query and more
meaning.)

For each query, its top-k training sequences are compared with k random training sequences (the control)
on token overlap -- TF-IDF cosine over words and the length of the longest common word n-gram -- and,
given an `embed` function (e.g. `steerlab.evaluate.soft.embeddings.sentence_embeddings`, which reads the
embedded all-MiniLM-L6-v2), on the cosine of sentence embeddings. A top-k that is more similar to the
query than random sequences in meaning but not in tokens is "abstract"; one that is more similar in
tokens is literal.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["abstraction_profile", "longest_common_ngram", "tfidf_cosines", "words"]

WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits and underscores)."""
    return WORD.findall(text.lower())


def longest_common_ngram(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest run of consecutive tokens shared by `a` and `b` (dynamic programming)."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def tfidf_cosines(queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
    """[queries, documents] cosine of word TF-IDF vectors, the vocabulary and document frequencies fitted
    on `documents` (scikit-learn's smoothed idf, L2-normalised rows)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(tokenizer=words, lowercase=False, token_pattern=None)
    docs = vectorizer.fit_transform(documents)
    return (vectorizer.transform(queries) @ docs.T).toarray()


def abstraction_profile(
    queries: Sequence[str],
    train: Sequence[str],
    top_index: torch.Tensor,
    *,
    embed: Callable[[list[str]], torch.Tensor] | None = None,
    seed: int = 0,
) -> dict:
    """Similarity of each query to its top-k training sequences (`top_index` [Q, k], e.g. a score run's
    `top_index`) and to k random training sequences (drawn without the top-k, seeded): per measure
    ("tfidf", "ngram" and, with `embed`, "embedding") the [Q, k] values for "top" and "random", and the
    mean over queries of (top mean - random mean) with a bootstrap 95% CI over queries."""
    top_index = torch.as_tensor(top_index).long()
    n_queries, k = top_index.shape
    if n_queries != len(queries):
        raise ValueError(f"{len(queries)} queries but top_index has {n_queries} rows")
    if len(train) < 2 * k:
        raise ValueError(
            f"{len(train)} training sequences: too few to draw {k} random ones beside the top-{k}"
        )
    rng = np.random.default_rng(seed)
    random_index = np.stack(
        [rng.choice(np.setdiff1d(np.arange(len(train)), row.numpy()), k, replace=False) for row in top_index]
    )
    groups = {"top": top_index.numpy(), "random": random_index}
    tfidf = tfidf_cosines(queries, train)
    query_words = [words(q) for q in queries]
    train_words = [words(t) for t in train]
    values: dict[str, dict[str, np.ndarray]] = {"tfidf": {}, "ngram": {}}
    for group, index in groups.items():
        values["tfidf"][group] = np.take_along_axis(tfidf, index, 1)
        values["ngram"][group] = np.array(
            [
                [longest_common_ngram(query_words[q], train_words[j]) for j in row]
                for q, row in enumerate(index)
            ],
            dtype=float,
        )
    if embed is not None:
        query_emb = torch.nn.functional.normalize(embed(list(queries)).double(), dim=-1)
        train_emb = torch.nn.functional.normalize(embed(list(train)).double(), dim=-1)
        cosines = (query_emb @ train_emb.T).numpy()
        values["embedding"] = {g: np.take_along_axis(cosines, i, 1) for g, i in groups.items()}
    out: dict = {"random_index": torch.as_tensor(random_index)}
    for measure, by_group in values.items():
        diff = by_group["top"].mean(1) - by_group["random"].mean(1)
        out[measure] = {**by_group, "top_minus_random": float(diff.mean()), "ci": _bootstrap(diff, seed)}
    return out


def _bootstrap(diff: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
