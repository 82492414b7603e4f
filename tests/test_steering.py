import json

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.data import ABDataset, ABItem, PairedTexts, encode, format_prompt, locate_answers
from steerlab.hooks import Positions, capture_residual
from steerlab.models import wrap
from steerlab.steering import SteeringVector, extract_caa, extract_mean_difference

LAYERS = [0, 2, -1]


def _ab_dataset(n: int = 6) -> ABDataset:
    items = []
    for i in range(n):
        match, other = ("(A)", "(B)") if i % 2 == 0 else ("(B)", "(A)")
        question = (
            f"Question {i}: is {i} {'even' if i % 2 == 0 else 'odd'}?\n\nChoices:\n (A) yes {i}\n (B) no {i}"
        )
        items.append(ABItem(question, match, other))
    return ABDataset(items, name="toy")


def _hidden(model, ids: list[int], layers) -> dict[int, torch.Tensor]:
    with torch.no_grad(), capture_residual(model, layers) as captured:
        model(torch.tensor([ids]))
    return {layer: h[0] for layer, h in captured.items()}


def test_caa_equals_hand_computed_mean_difference(tiny_lm):
    dataset = _ab_dataset()
    vector = extract_caa(tiny_lm, dataset, LAYERS, batch_size=4, progress=False)
    assert vector.layers == [0, 2, 3]
    expected = {layer: torch.zeros(32, dtype=torch.float64) for layer in (0, 2, 3)}
    for item in dataset:
        prompt = format_prompt(tiny_lm.tokenizer, item.question)
        where = locate_answers(tiny_lm.tokenizer, prompt, [item.matching, item.not_matching])
        pos = _hidden(tiny_lm.model, where.option_ids[0], [0, 2, 3])
        neg = _hidden(tiny_lm.model, where.option_ids[1], [0, 2, 3])
        for layer in expected:
            expected[layer] += (pos[layer][where.position] - neg[layer][where.position]) / len(dataset)
    for layer, value in expected.items():
        torch.testing.assert_close(vector.vectors[layer].double(), value, rtol=1e-6, atol=1e-7)
        assert vector.vectors[layer].norm() > 0
    assert vector.metadata["dataset"]["letter_counts"] == {"(A)": 3, "(B)": 3}


def test_batched_equals_unbatched_with_mixed_padding(tiny_lm):
    texts = PairedTexts(
        ["good day", "a truly wonderful long afternoon outside", "yes!"],
        ["bad day", "a truly miserable long afternoon inside", "no."],
    )
    for read in ("last", "mean"):
        one = extract_mean_difference(tiny_lm, texts, LAYERS, read=read, batch_size=1, progress=False)
        many = extract_mean_difference(tiny_lm, texts, LAYERS, read=read, batch_size=3, progress=False)
        for layer in one.layers:
            torch.testing.assert_close(many.vectors[layer], one.vectors[layer], rtol=1e-5, atol=1e-6)


def test_mean_reading_averages_positions_after_the_sink(tiny_lm):
    texts = PairedTexts(["abcd"], ["wxyz"])
    vector = extract_mean_difference(tiny_lm, texts, [1], read="mean", progress=False)
    pos = _hidden(tiny_lm.model, encode(tiny_lm.tokenizer, "abcd"), [1])[1]
    neg = _hidden(tiny_lm.model, encode(tiny_lm.tokenizer, "wxyz"), [1])[1]
    expected = pos[1:].mean(0) - neg[1:].mean(0)
    torch.testing.assert_close(vector.vectors[1].double(), expected, rtol=1e-6, atol=1e-7)


def test_save_load_round_trip(tiny_lm, tmp_path):
    vector = extract_caa(tiny_lm, _ab_dataset(), LAYERS, progress=False)
    path = vector.save(tmp_path / "vec")
    assert path.suffix == ".safetensors" and (tmp_path / "vec.json").exists()
    meta = json.loads((tmp_path / "vec.json").read_text())
    assert meta["method"] == "caa" and meta["model"]["name"] == "tiny-llama"
    assert set(meta["norms"]) == {"0", "2", "3"} and set(meta["residual_norms"]) == {"0", "2", "3"}
    loaded = SteeringVector.load(tmp_path / "vec.safetensors")
    assert loaded.layers == vector.layers
    for layer in vector.layers:
        assert torch.equal(loaded.vectors[layer], vector.vectors[layer])
    assert loaded.metadata["dataset"]["fingerprint"] == vector.metadata["dataset"]["fingerprint"]


def test_loading_into_a_model_of_another_width_is_a_clear_error(tiny_lm):
    vector = SteeringVector({1: torch.ones(576)}, {"model": {"name": "smollm2-135m"}})
    with pytest.raises(ValueError, match="width 576 .*smollm2-135m.* width 32"):
        with vector.apply(tiny_lm, layer=1):
            pass


def test_apply_adds_multiplier_times_vector(tiny_lm):
    vector = SteeringVector({2: torch.randn(32, dtype=torch.float64)})
    ids = torch.tensor([encode(tiny_lm.tokenizer, "hello there")])
    with torch.no_grad(), capture_residual(tiny_lm.model, [2]) as base:
        tiny_lm.model(ids)
    plain = base[2].clone()
    with torch.no_grad(), vector.apply(tiny_lm, layer=-2, multiplier=-1.5, positions=Positions.all()):
        with capture_residual(tiny_lm.model, [2]) as steered:
            tiny_lm.model(ids)
    torch.testing.assert_close(steered[2][0, 1:] - plain[0, 1:], (-1.5 * vector.vectors[2]).expand(10, -1))
    torch.testing.assert_close(steered[2][0, 0], plain[0, 0])


def test_random_control_has_the_same_norm():
    vector = SteeringVector({3: torch.randn(32) * 7})
    control = vector.random_like(seed=1)
    assert abs(control.norm(3) - vector.norm(3)) < 1e-4
    assert abs(torch.nn.functional.cosine_similarity(control.vectors[3], vector.vectors[3], dim=0)) < 0.9


def test_multiple_families_extract():
    for family in ("gpt2", "gpt_neox", "qwen2"):
        lm = wrap(tiny_model(family), char_tokenizer(), name=family)
        vector = extract_mean_difference(lm, PairedTexts(["nice"], ["nasty"]), [0, -1], progress=False)
        assert vector.layers == [0, 3] and vector.hidden_size == 32
