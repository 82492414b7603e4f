import pytest
import torch

from steerlab.data import ABDataset, ABItem, PairedTexts, PromptSet
from steerlab.errors import UserError
from steerlab.evaluate import ab_scores, bootstrap_ci, prepare_ab
from steerlab.steering import SteeringVector
from steerlab.steering.metrics import behaviour_metric, compare, summarise

QUESTION = "Which?\n\nChoices:\n (A) {a}\n (B) {b}"


def _ab() -> ABDataset:
    items = [
        ABItem(QUESTION.format(a="yes", b="no"), "(A)", "(B)"),
        ABItem(QUESTION.format(a="up", b="down"), "(B)", "(A)"),
        ABItem(QUESTION.format(a="hot", b="cold"), "(A)", "(B)"),
    ]
    return ABDataset(items, "ab")


def test_ab_metric_is_p_matching_p_first_and_chance(tiny_lm):
    dataset = _ab()
    scores = behaviour_metric(tiny_lm, dataset)(tiny_lm)
    expected = ab_scores(tiny_lm, prepare_ab(tiny_lm, dataset))
    torch.testing.assert_close(scores["score"], expected.p_matching)
    torch.testing.assert_close(scores["p_first"], expected.p_first)
    torch.testing.assert_close(scores["chance"], torch.full((3,), 0.5, dtype=torch.float64))
    # the second item's matching answer is (B): p_matching + p_first = 1 there, 2 p_first elsewhere
    torch.testing.assert_close(scores["score"][1], 1 - scores["p_first"][1])


def test_metric_refuses_prompts_without_words_and_paired_texts(tiny_lm):
    with pytest.raises(UserError, match="needs word lists"):
        behaviour_metric(tiny_lm, PromptSet(["a b"]))
    with pytest.raises(UserError, match="paired texts are for extraction"):
        behaviour_metric(tiny_lm, PairedTexts(["a"], ["b"]))


def test_summarise_is_the_bootstrap_mean_and_the_means():
    scores = {
        "score": torch.tensor([0.2, 0.4, 0.9]),
        "p_first": torch.tensor([0.1, 0.2, 0.3]),
        "chance": torch.full((3,), 0.5),
    }
    out = summarise(scores)
    mean, low, high = bootstrap_ci([0.2, 0.4, 0.9])
    assert (
        out["score"] == pytest.approx(0.5)
        and out["ci"] == pytest.approx([low, high])
        and mean == pytest.approx(0.5)
    )
    assert out["p_first"] == pytest.approx(0.2) and out["chance"] == 0.5 and out["n_items"] == 3


def test_compare_scores_unsteered_and_both_signs(tiny_lm):
    torch.manual_seed(0)
    vector = SteeringVector({2: torch.randn(32, dtype=torch.float64)}, {"residual_norms": {"2": 5.0}})
    metric = behaviour_metric(tiny_lm, _ab())
    plain = summarise(metric(tiny_lm))
    results = compare(tiny_lm, vector, metric, 2, 4.0, progress=False)
    assert list(results) == ["unsteered", "-m", "+m"]
    assert results["unsteered"]["score"] == pytest.approx(plain["score"])
    with vector.apply(tiny_lm, layer=2, multiplier=4.0):
        assert results["+m"]["score"] == pytest.approx(summarise(metric(tiny_lm))["score"])
    assert results["+m"]["score"] != pytest.approx(results["-m"]["score"])
    assert "perplexity" not in results["+m"]  # no neutral text given
