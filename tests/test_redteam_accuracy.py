"""The benchmark-failure attack: its objective is log P(right letter) as `ab_scores` computes it, and the
run reports held-out accuracy for optimised and random vectors."""

from __future__ import annotations

import torch

from conftest import char_tokenizer, tiny_model
from steerlab.data import ABDataset
from steerlab.data.contrast import ABItem
from steerlab.evaluate import ab_scores, prepare_ab
from steerlab.models import wrap
from steerlab.redteam import attacks as A
from steerlab.redteam.accuracy import ab_objective, ab_probability, accuracy_attack


def dataset(n: int = 8) -> ABDataset:
    items = [
        ABItem(f"Q{i}: pick one\n (A) yes\n (B) no", "(A)" if i % 2 else "(B)", "(B)" if i % 2 else "(A)")
        for i in range(n)
    ]
    return ABDataset(items, "toy")


def test_ab_objective_matches_ab_scores():
    lm = wrap(tiny_model("llama", attn="sdpa"), char_tokenizer(), name="tiny")
    prepared = prepare_ab(lm, dataset())
    batches = A.make_batches(lm, [], None, 3, token_ids=prepared.prefixes)
    ours = A.batch_scores(lm, 1, batches, ab_objective(prepared), None)
    expected = ab_scores(lm, prepared).p_matching.log()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-8)
    probability = A.batch_scores(lm, 1, batches, ab_probability(prepared), None)
    torch.testing.assert_close(probability, expected.exp(), rtol=1e-6, atol=1e-8)


def test_accuracy_attack_rows():
    lm = wrap(tiny_model("llama", attn="sdpa"), char_tokenizer(), name="tiny")
    rows = accuracy_attack(
        lm, dataset(), layers=[1], eps=[0.5, 1.0], n_train=4, n_random=2, steps=2, batch_size=4
    )
    assert [r["method"] for r in rows] == ["none", "optimised", "random", "optimised", "random"]
    assert all(r["n_test"] == 4 and 0 <= r["accuracy"] <= 1 for r in rows)
