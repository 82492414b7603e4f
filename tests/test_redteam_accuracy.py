"""The benchmark-failure attack: its objective is log P(right letter) as `ab_scores` computes it, its
correctness is the argmax over the options, cloze items become the same prepared prompts, and the run
reports held-out accuracy for optimised and random vectors."""

from __future__ import annotations

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.data import ABDataset, ClozeItem, load_builtin, load_cloze
from steerlab.data.contrast import ABItem
from steerlab.errors import UserError
from steerlab.evaluate import ab_scores, last_token_logprobs, prepare_ab, prepare_cloze
from steerlab.models import wrap
from steerlab.redteam import attacks as A
from steerlab.redteam.accuracy import ab_margin, ab_objective, ab_probability, accuracy_attack, split_items


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


def cloze_items() -> list[ClozeItem]:
    return [ClozeItem(f"stem {i}", ("abc", "bcd", "cde"), i % 3) for i in range(9)]


def test_margin_is_positive_exactly_where_the_right_option_is_the_argmax():
    lm = wrap(tiny_model("llama", attn="sdpa"), char_tokenizer(), name="tiny")
    prepared = prepare_cloze(lm, cloze_items())
    batches = A.make_batches(lm, [], None, 4, token_ids=prepared.prefixes)
    margin = A.batch_scores(lm, 1, batches, ab_margin(prepared), None)
    logprobs = last_token_logprobs(lm, prepared.prefixes)
    for row, tokens in enumerate(prepared.option_tokens):
        options = logprobs[row, tokens]
        right = prepared.matching_index[row]
        expected = options[right] - max(options[j] for j in range(3) if j != right)
        assert float(margin[row]) == pytest.approx(float(expected), abs=1e-5)
    assert len(set(map(tuple, prepared.option_tokens))) == 1  # the characters a, b, c after the space


def test_cloze_choices_sharing_a_first_token_are_refused():
    lm = wrap(tiny_model("llama", attn="sdpa"), char_tokenizer(), name="tiny")
    with pytest.raises(UserError, match=r"item 0 .*same token"):
        prepare_cloze(lm, [ClozeItem("stem", ("abc", "abd", "xyz"), 0)])


def test_easy_cloze_is_well_formed(tmp_path):
    items = load_builtin("easy-cloze")
    assert len(items) >= 60 and all(len(i.choices) == 4 for i in items)
    assert len({i.stem for i in items}) == len(items)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"stem": "x", "choices": ["a", "b"], "answer": 2}]')
    with pytest.raises(UserError, match=r"record 0: field 'answer'"):
        load_cloze(bad)


def test_split_is_disjoint_and_seeded():
    lm = wrap(tiny_model("llama", attn="sdpa"), char_tokenizer(), name="tiny")
    prepared = prepare_cloze(lm, cloze_items())
    train, test = split_items(prepared, 3, seed=1)
    again, _ = split_items(prepared, 3, seed=1)
    assert train == again and len(test.prefixes) == 6
    assert not {tuple(p) for p in train.prefixes} & {tuple(p) for p in test.prefixes}
    with pytest.raises(UserError, match="n_train 9"):
        split_items(prepared, 9)


def test_accuracy_attack_rows():
    lm = wrap(tiny_model("llama", attn="sdpa"), char_tokenizer(), name="tiny")
    rows = accuracy_attack(
        lm,
        prepare_ab(lm, dataset()),
        layers=[1],
        eps=[0.5, 1.0],
        n_train=4,
        n_random=2,
        steps=2,
        batch_size=4,
    )
    assert [r["method"] for r in rows] == ["none", "optimised", "random", "optimised", "random"]
    assert all(r["n_test"] == 4 and 0 <= r["accuracy"] <= 1 for r in rows)
