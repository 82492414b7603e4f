import math

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.data import ABDataset, ABItem, encode, format_prompt, locate_answers
from steerlab.errors import UserError
from steerlab.evaluate import (
    WordPreference,
    ab_scores,
    auroc,
    bootstrap_ci,
    generate,
    last_token_logprobs,
    prepare_ab,
    prepare_neutral,
    prepare_word_preference,
    side_effects,
    word_preference,
)
from steerlab.models import wrap
from steerlab.steering import SteeringVector


def _logprobs(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)


def test_last_token_logprobs_match_unbatched(tiny_lm):
    sequences = [encode(tiny_lm.tokenizer, t) for t in ("a", "hello world", "abc def gh")]
    batched = last_token_logprobs(tiny_lm, sequences, batch_size=3)
    for row, ids in enumerate(sequences):
        torch.testing.assert_close(batched[row].double(), _logprobs(tiny_lm, ids), rtol=1e-5, atol=1e-5)


def test_ab_scores_normalise_over_offered_letters(tiny_lm):
    items = [
        ABItem("Pick one?\n\nChoices:\n (A) x\n (B) y\n (C) z", "(C)", "(A)"),
        ABItem("Other?\n\nChoices:\n (A) p\n (B) q", "(A)", "(B)"),
    ]
    scores = ab_scores(tiny_lm, prepare_ab(tiny_lm, ABDataset(items)))
    for row, item in enumerate(items):
        prompt = format_prompt(tiny_lm.tokenizer, item.question)
        where = locate_answers(tiny_lm.tokenizer, prompt, list(item.options))
        probs = _logprobs(tiny_lm, where.prefix_ids)[where.answer_token_ids].softmax(-1)
        assert math.isclose(
            float(scores.p_matching[row]), float(probs[item.options.index(item.matching)]), rel_tol=1e-5
        )
        assert math.isclose(float(scores.p_first[row]), float(probs[0]), rel_tol=1e-5)


def test_word_preference_by_hand(tiny_lm):
    ids = encode(tiny_lm.tokenizer, "it was")
    prepared = WordPreference(
        [ids, encode(tiny_lm.tokenizer, "so")], positive_tokens=[10, 11], negative_tokens=[12]
    )
    p = word_preference(tiny_lm, prepared)
    lp = _logprobs(tiny_lm, ids)
    pos, neg = lp[[10, 11]].exp().sum(), lp[12].exp()
    assert math.isclose(float(p[0]), float(pos / (pos + neg)), rel_tol=1e-6)


def test_word_lists_that_collide_are_refused(tiny_lm):
    # with a character tokenizer every word after a space starts with the same token " "
    with pytest.raises(ValueError, match="share every first token"):
        prepare_word_preference(tiny_lm, ["it was"], ["good"], ["bad"])


def test_side_effects_are_zero_without_steering_and_grow_with_it(tiny_lm):
    neutral = prepare_neutral(tiny_lm, ["the cat sat on the mat", "water is wet"])
    base = side_effects(tiny_lm, neutral)
    assert abs(base.kl) < 1e-6
    ids = neutral.ids[0, neutral.mask[0].bool()]
    logprobs = torch.log_softmax(tiny_lm.model(ids[None]).logits[0, :-1].double(), -1)
    nll0 = -logprobs.gather(-1, ids[1:, None]).mean()
    assert base.perplexity > 1
    vector = SteeringVector({1: torch.randn(32, dtype=torch.float64) * 3})
    with vector.apply(tiny_lm, layer=1, multiplier=2.0):
        steered = side_effects(tiny_lm, neutral)
    assert steered.kl > 1e-3 and steered.perplexity != base.perplexity
    assert nll0 > 0


def test_generate_batched_equals_single_and_respects_steering():
    lm = wrap(tiny_model("llama", attn="sdpa"), char_tokenizer(), name="tiny")
    prompts = ["hi", "a longer prompt here"]
    batched = generate(lm, prompts, max_new_tokens=6, batch_size=2)
    single = [generate(lm, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    vector = SteeringVector({1: torch.randn(32, dtype=torch.float64) * 10})
    with vector.apply(lm, layer=1, multiplier=1.0):
        steered = generate(lm, prompts, max_new_tokens=6, batch_size=2)
    assert steered != batched


def test_bootstrap_and_auroc():
    mean, low, high = bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and low < 2.5 < high
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0 and auroc([1], [1]) == 0.5


def test_ab_scores_give_the_chance_level_of_each_item(tiny_lm):
    items = [
        ABItem("Pick one?\n\nChoices:\n (A) x\n (B) y\n (C) z", "(C)", "(A)"),
        ABItem("Other?\n\nChoices:\n (A) p\n (B) q", "(A)", "(B)"),
        ABItem("Many?\n\nChoices:\n (A) p\n (B) q\n (C) r\n (D) s\n (E) t", "(E)", "(A)"),
    ]
    scores = ab_scores(tiny_lm, prepare_ab(tiny_lm, ABDataset(items)))
    assert scores.chance.tolist() == [1 / 3, 1 / 2, 1 / 5]


def test_side_effects_in_batches_equal_one_batch(tiny_lm):
    texts = ["the cat sat on the mat", "water is wet", "a", "some longer neutral sentence here"]
    whole = prepare_neutral(tiny_lm, texts, batch_size=4)
    split = prepare_neutral(tiny_lm, texts, batch_size=3)
    torch.testing.assert_close(split.base_logprobs, whole.base_logprobs)
    vector = SteeringVector({1: torch.randn(32, dtype=torch.float64) * 3})
    with vector.apply(tiny_lm, layer=1, multiplier=2.0):
        a, b = side_effects(tiny_lm, whole, batch_size=4), side_effects(tiny_lm, whole, batch_size=1)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-9) and a.kl == pytest.approx(b.kl, rel=1e-9)


def test_slow_evaluations_show_progress_when_asked(tiny_lm, capsys):
    items = ABDataset([ABItem("Other?\n\nChoices:\n (A) p\n (B) q", "(A)", "(B)")])
    prepared = prepare_ab(tiny_lm, items)
    words = WordPreference([encode(tiny_lm.tokenizer, "it was")], positive_tokens=[10], negative_tokens=[12])
    neutral = prepare_neutral(tiny_lm, ["water is wet"])
    calls = {
        "A/B items": lambda progress: ab_scores(tiny_lm, prepared, progress=progress),
        "prompts": lambda progress: word_preference(tiny_lm, words, progress=progress),
        "neutral text": lambda progress: side_effects(tiny_lm, neutral, progress=progress),
        "generating": lambda progress: generate(tiny_lm, ["hi"], max_new_tokens=2, progress=progress),
    }
    for label, call in calls.items():
        call(False)
        assert label not in capsys.readouterr().err
        call(True)
        assert f"{label}: 100%" in capsys.readouterr().err


def test_word_lists_that_collide_are_a_user_error(tiny_lm):
    with pytest.raises(UserError, match="share every first token"):
        prepare_word_preference(tiny_lm, ["it was"], ["good"], ["bad"])
