"""Token-overlap and semantic similarity of top-influence sequences against random ones."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from steerlab.influence.abstraction import abstraction_profile, longest_common_ngram, tfidf_cosines, words


def brute_longest_common_ngram(a, b):
    best = 0
    for n in range(1, min(len(a), len(b)) + 1):
        grams = {tuple(a[i : i + n]) for i in range(len(a) - n + 1)}
        if any(tuple(b[j : j + n]) in grams for j in range(len(b) - n + 1)):
            best = n
    return best


def test_longest_common_ngram_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = list(rng.integers(0, 3, rng.integers(0, 9)))
        b = list(rng.integers(0, 3, rng.integers(0, 9)))
        assert longest_common_ngram(a, b) == brute_longest_common_ngram(a, b)
    assert longest_common_ngram(words("The cat sat on the mat"), words("a cat sat on a hat")) == 3


def test_tfidf_cosine_by_hand():
    """Two documents, smoothed idf = ln((1 + n) / (1 + df)) + 1, L2-normalised: computed by hand."""
    docs = ["apple banana", "apple cherry cherry"]
    got = tfidf_cosines(["banana apple", "durian"], docs)
    idf = {w: math.log(3 / (1 + df)) + 1 for w, df in {"apple": 2, "banana": 1, "cherry": 1}.items()}

    def vec(counts):
        v = np.array([counts.get(w, 0) * idf[w] for w in ("apple", "banana", "cherry")])
        return v / np.linalg.norm(v)

    d0, d1 = vec({"apple": 1, "banana": 1}), vec({"apple": 1, "cherry": 2})
    q = vec({"banana": 1, "apple": 1})
    assert np.allclose(got[0], [q @ d0, q @ d1])
    assert np.allclose(got[0, 0], 1.0)
    assert np.allclose(got[1], 0.0)  # no shared word


def test_profile_separates_literal_from_semantic_neighbours():
    """Top-k sequences that copy the query's words score higher than random ones on token overlap; a fake
    embedding that maps 'related' texts together gives the semantic measure its own signal."""
    queries = ["the red lobster shell", "a quick brown fox"]
    train = [
        "the red lobster shell turns red",  # literal neighbour of query 0
        "crustaceans change colour when cooked",  # semantic neighbour of query 0
        "a quick brown fox jumps",  # literal neighbour of query 1
        "foxes are fast animals",  # semantic neighbour of query 1
        *[f"unrelated text number {i}" for i in range(12)],
    ]
    topics = {"lobster": 0, "crustaceans": 0, "fox": 1, "foxes": 1}

    def embed(texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            hit = [topics[w] for w in words(t) if w in topics]
            out[i, hit[0] if hit else 2] = 1.0
        return out

    literal = abstraction_profile(queries, train, torch.tensor([[0], [2]]), embed=embed)
    semantic = abstraction_profile(queries, train, torch.tensor([[1], [3]]), embed=embed)
    assert literal["tfidf"]["top_minus_random"] > 0.5 and literal["ngram"]["top_minus_random"] >= 4
    assert semantic["tfidf"]["top_minus_random"] == pytest.approx(0.0)
    assert semantic["ngram"]["top_minus_random"] <= 0
    assert semantic["embedding"]["top_minus_random"] == pytest.approx(1.0)
    assert np.allclose(semantic["embedding"]["random"], 0.0)
    for row, top in zip(literal["random_index"], [0, 2]):
        assert top not in row.tolist()  # the control never draws a top-k sequence
    low, high = literal["tfidf"]["ci"]
    assert low <= literal["tfidf"]["top_minus_random"] <= high
    with pytest.raises(ValueError, match="too few"):
        abstraction_profile(queries, train[:3], torch.tensor([[0, 1], [2, 1]]))


def test_profile_is_seeded():
    queries, train = ["a b"], [f"w{i} a" for i in range(10)]
    one = abstraction_profile(queries, train, torch.tensor([[0, 1]]), seed=3)
    two = abstraction_profile(queries, train, torch.tensor([[0, 1]]), seed=3)
    assert torch.equal(one["random_index"], two["random_index"])
    assert list(itertools.chain(*one["random_index"].tolist())) != [0, 1]
