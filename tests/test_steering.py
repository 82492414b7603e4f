import json
import re
import warnings

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.data import (
    ABDataset,
    ABItem,
    DataFormatError,
    PairedTexts,
    encode,
    format_prompt,
    load_ab,
    locate_answers,
)
from steerlab.errors import UserError
from steerlab.hooks import Positions, capture_residual
from steerlab.io import ResultFileError, save_tensors
from steerlab.models import wrap
from steerlab.steering import (
    STRONG_STEERING_RATIO,
    InvalidVectorError,
    LayerChoiceError,
    SteeringVector,
    StrongSteeringWarning,
    VectorError,
    caa_items,
    extract_caa,
    extract_mean_difference,
)

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


# --- validation on load, construction and apply ------------------------------------------------------------


def _saved(tiny_lm, tmp_path):
    vector = extract_mean_difference(tiny_lm, PairedTexts(["good day"], ["bad day"]), [1, 2], progress=False)
    vector.save(tmp_path / "vec")
    return tmp_path / "vec.safetensors", tmp_path / "vec.json"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:40]), "vec.safetensors: not a readable safetensors file"),
        (lambda f: f.write_bytes(b""), "vec.safetensors: not a readable safetensors file"),
        (lambda f: f.write_bytes(bytes(range(256)) * 4), "vec.safetensors: not a readable safetensors file"),
        (lambda f: f.with_suffix(".json").unlink(), "vec.json: no such file"),
        (lambda f: f.unlink(), "vec.safetensors: no such file"),
    ],
    ids=["truncated", "empty", "random-bytes", "missing-json", "missing-tensors"],
)
def test_load_names_the_broken_file(tiny_lm, tmp_path, damage, message):
    tensors, _ = _saved(tiny_lm, tmp_path)
    damage(tensors)
    with pytest.raises(ResultFileError, match=re.escape(message)):
        SteeringVector.load(tensors)


def _replace_tensors(path, tensors):
    save_tensors(path, {f"layer.{layer}": value for layer, value in tensors.items()})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_load_refuses_non_finite_values(tiny_lm, tmp_path, value):
    tensors, _ = _saved(tiny_lm, tmp_path)
    vector = SteeringVector.load(tensors)
    bad = vector.vectors[2].clone()
    bad[5] = value
    _replace_tensors(tensors, {1: vector.vectors[1], 2: bad})
    with pytest.raises(
        InvalidVectorError, match="vec.safetensors: layer 2: 1 of 32 values are NaN or infinite"
    ):
        SteeringVector.load(tensors)


def test_load_refuses_an_all_zero_layer(tiny_lm, tmp_path):
    tensors, _ = _saved(tiny_lm, tmp_path)
    vector = SteeringVector.load(tensors)
    _replace_tensors(tensors, {1: torch.zeros(32), 2: vector.vectors[2]})
    with pytest.raises(InvalidVectorError, match="vec.safetensors: layer 1: the vector is all zeros"):
        SteeringVector.load(tensors)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["residual_norms"].pop("2"),
            r"field 'residual_norms' names layers \['1'\] but the tensors hold layers \[1, 2\]",
        ),
        (
            lambda m: m["model"].update(hidden_size=576),
            "records hidden size 576 for tiny-llama but the tensors have width 32",
        ),
        (lambda m: m.update(layers=[0, 1]), r"field 'layers' names layers \['0', '1'\]"),
        (lambda m: m.update(norms={"0": 1.0, "2": 1.0}), r"field 'norms' names layers \['0', '2'\]"),
        (
            lambda m: m["norms"].update({"1": 123.0}),
            "field 'norms': layer 1 has 123.0 but the tensor's norm is",
        ),
        (lambda m: m["residual_norms"].update({"1": None}), "field 'residual_norms': layer 1 has None"),
        (
            lambda m: m["model"].update(num_layers=2),
            r"records 2 layers for tiny-llama but the tensors hold layers \[1, 2\]",
        ),
    ],
    ids=["residual-norm-keys", "width", "layers", "norm-keys", "norm-value", "residual-null", "model-layers"],
)
def test_load_refuses_metadata_that_disagrees_with_the_tensors(tiny_lm, tmp_path, edit, message):
    tensors, meta_path = _saved(tiny_lm, tmp_path)
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InvalidVectorError, match=f"vec.json: {message}"):
        SteeringVector.load(tensors)


def test_a_nan_or_zero_vector_built_in_python_fails_clearly(tiny_lm):
    with pytest.raises(InvalidVectorError, match="steering vector: layer 1: 32 of 32 values are NaN"):
        SteeringVector({1: torch.full((32,), float("nan"))})
    with pytest.raises(InvalidVectorError, match="layer 0: the vector is all zeros"):
        SteeringVector({0: torch.zeros(32)})
    with pytest.raises(InvalidVectorError, match="different widths"):
        SteeringVector({0: torch.ones(32), 1: torch.ones(16)})
    with pytest.raises(VectorError, match="multiplier nan is not a finite number"):
        SteeringVector({1: torch.ones(32)}).apply(tiny_lm, layer=1, multiplier=float("nan"))


def test_multiplier_for_fraction_of_a_zeroed_vector_is_an_error():
    vector = SteeringVector({1: torch.ones(32)}, {"residual_norms": {"1": 10.0}})
    vector.vectors[1].zero_()
    with pytest.raises(InvalidVectorError, match="layer 1: the vector is all zeros"):
        vector.multiplier_for_fraction(1, 0.5)


# --- layer choice ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            99,
            r"layer 99 is out of range: the model has 4 layers \(0..3, or -4..-1 counting from the end\); "
            r"this vector stores layers \[0, 2, 3\]",
        ),
        (-99, r"layer -99 is out of range: the model has 4 layers"),
        (1, r"layer 1 is not stored in this vector: it stores layers \[0, 2, 3\] of the model's 4 \(0..3\)"),
        (-3, r"layer -3 \(= layer 1\) is not stored in this vector"),
    ],
)
def test_layer_errors_name_the_models_and_the_vectors_layers(tiny_lm, layer, message):
    vector = extract_caa(tiny_lm, _ab_dataset(), LAYERS, progress=False)
    with pytest.raises(LayerChoiceError, match=message):
        vector.multiplier_for_fraction(layer, 0.5)
    with pytest.raises(LayerChoiceError, match=message):
        vector.apply(tiny_lm, layer=layer)
    assert vector.multiplier_for_fraction(-1, 0.5) == vector.multiplier_for_fraction(3, 0.5)
    assert vector.multiplier_for_fraction(3, 0.5) * vector.norm(3) == pytest.approx(
        0.5 * vector.residual_norm(3)
    )


def test_layer_errors_without_recorded_model():
    vector = SteeringVector({2: torch.ones(32)})
    with pytest.raises(LayerChoiceError, match=r"layer 5: this vector stores layers \[2\]$"):
        vector.norm(5)
    with pytest.raises(LayerChoiceError, match="negative layer counts from the end"):
        vector.norm(-1)
    with pytest.raises(VectorError, match="records no residual norm at layer 2"):
        vector.multiplier_for_fraction(2, 0.1)


def test_a_vector_from_a_deeper_model_names_the_layers(tiny_lm):
    vector = SteeringVector({2: torch.ones(32), 20: torch.ones(32)})
    with pytest.raises(LayerChoiceError, match=r"stores layers \[2, 20\] but the model has 4 layers"):
        vector.apply(tiny_lm, layer=2)


# --- strength warning --------------------------------------------------------------------------------------


def test_warns_when_the_added_norm_dwarfs_the_residual_norm(tiny_lm):
    vector = SteeringVector({1: torch.full((32,), 0.5)}, {"residual_norms": {"1": 4.0}})  # |v| = 0.5 sqrt(32)
    assert vector.fraction_of_residual(1, -2.0) == pytest.approx(2.0 * 0.5 * 32**0.5 / 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vector.apply(tiny_lm, layer=1, multiplier=vector.multiplier_for_fraction(1, STRONG_STEERING_RATIO))
    with pytest.warns(
        StrongSteeringWarning,
        match=r"layer 1: multiplier 1e\+09 adds a vector of norm .*x the residual norm 4",
    ):
        vector.apply(tiny_lm, layer=1, multiplier=1e9)
    assert SteeringVector({1: torch.ones(32)}).fraction_of_residual(1, 5.0) is None


# --- metadata ----------------------------------------------------------------------------------------------


def test_metadata_records_chat_template_system_prompt_and_source(tiny_lm, tmp_path):
    texts = PairedTexts(["good day", "nice walk"], ["bad day", "awful walk"], source="pairs.json")
    plain = extract_mean_difference(tiny_lm, texts, [1], progress=False)
    chat = extract_mean_difference(tiny_lm, texts, [1], chat=True, progress=False, source="elsewhere.json")
    assert not torch.allclose(plain.vectors[1], chat.vectors[1])
    assert (plain.metadata["chat"], plain.metadata["chat_template"]) == (False, False)
    assert (chat.metadata["chat"], chat.metadata["chat_template"]) == (True, True)
    assert plain.metadata["system_prompt"] is None and chat.metadata["system_prompt_source"] is None
    assert plain.metadata["dataset"]["source"] == "pairs.json"
    assert chat.metadata["dataset"]["source"] == "elsewhere.json"
    given = extract_mean_difference(tiny_lm, texts, [1], chat=True, system_prompt="Be kind.", progress=False)
    assert (given.metadata["system_prompt"], given.metadata["system_prompt_source"]) == ("Be kind.", "given")
    with pytest.raises(
        UserError, match="--system-prompt: paired texts take a system prompt only with --chat"
    ):
        extract_mean_difference(tiny_lm, texts, [1], system_prompt="Be kind.", progress=False)
    path = tmp_path / "ab.json"
    path.write_text(
        json.dumps(
            [
                {
                    "question": item.question,
                    "answer_matching_behavior": item.matching,
                    "answer_not_matching_behavior": item.not_matching,
                }
                for item in _ab_dataset()
            ]
        )
    )
    caa = extract_caa(tiny_lm, load_ab(path), [1], progress=False)
    assert caa.metadata["dataset"]["source"] == str(path) and caa.metadata["chat_template"] is True


def test_metadata_records_the_templates_default_system_prompt():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<s>system: Be brief.\n{% endif %}"
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    lm = wrap(tiny_model("llama"), tokenizer, name="tiny")
    vector = extract_caa(lm, _ab_dataset(), [1], progress=False)
    assert vector.metadata["system_prompt"] == "Be brief."
    assert vector.metadata["system_prompt_source"] == "template default"


# --- A/B balancing -----------------------------------------------------------------------------------------


def test_caa_with_nothing_left_after_balancing_fails_before_reading(tiny_lm, tmp_path):
    path = tmp_path / "one.json"
    item = _ab_dataset(1)[0]
    path.write_text(
        json.dumps(
            [
                {
                    "question": item.question,
                    "answer_matching_behavior": "(A)",
                    "answer_not_matching_behavior": "(B)",
                }
            ]
        )
    )
    with pytest.raises(
        DataFormatError, match=f"{re.escape(str(path))}: balancing the answer letters keeps none"
    ):
        extract_caa(tiny_lm, load_ab(path), [1], progress=False)
    one = extract_caa(tiny_lm, load_ab(path), [1], balance=False, progress=False)
    assert one.metadata["dataset"]["size"] == 1
    with pytest.raises(UserError, match="holds no items"):
        caa_items(ABDataset([], name="empty"))


def test_extraction_from_identical_sides_says_so(tiny_lm):
    texts = PairedTexts(["same text", "other"], ["same text", "other"])
    with pytest.raises(
        UserError,
        match=r"layer 1: the vector is all zeros \(the positive and negative examples give the same",
    ):
        extract_mean_difference(tiny_lm, texts, [1], progress=False)


# --- validation once, strengths, commands ----------------------------------------------------------------


def test_vectors_are_checked_once_at_construction_not_on_every_apply(tiny_lm, tmp_path, monkeypatch):
    import steerlab.steering.vector as vector_module

    calls = []
    real = vector_module.tensor_problem
    monkeypatch.setattr(vector_module, "tensor_problem", lambda vectors: calls.append(1) or real(vectors))
    vector = SteeringVector({1: torch.ones(32)}, {"residual_norms": {"1": 4.0}})
    vector.save(tmp_path / "vec")
    assert len(calls) == 1
    SteeringVector.load(tmp_path / "vec")
    assert len(calls) == 2  # one check per construction, loading included
    for _ in range(3):
        with vector.apply(tiny_lm, layer=1, multiplier=0.5):
            pass
    assert len(calls) == 2


def test_signed_fraction_inverts_multiplier_for_fraction_and_feeds_grids():
    from steerlab.steering.sweep import Grid

    vector = SteeringVector({1: torch.full((32,), 0.5)}, {"residual_norms": {"1": 4.0}})
    norm = 0.5 * 32**0.5
    assert vector.signed_fraction(1, -2.0) == pytest.approx(-2.0 * norm / 4.0)
    assert vector.signed_fraction(1, vector.multiplier_for_fraction(1, -0.3)) == pytest.approx(-0.3)
    assert vector.fraction_of_residual(1, -2.0) == pytest.approx(2.0 * norm / 4.0)
    settings = Grid([1], multipliers=[-2.0, 0.0, 1.0]).settings(vector)
    assert settings == [(1, pytest.approx(-2.0 * norm / 4.0), -2.0), (1, pytest.approx(norm / 4.0), 1.0)]
    assert SteeringVector({1: torch.ones(32)}).signed_fraction(1, 1.0) is None


def test_extract_command_balances_once_and_records_the_counts_before(tiny_lm, tmp_path, caplog):
    from steerlab.steering.commands import ExtractArgs, extract

    dataset = ABDataset(
        [*_ab_dataset(6).items[:4], *_ab_dataset(6).items[4:5]], name="toy", source="toy.json"
    )
    args = ExtractArgs(data=dataset, layers=[1], out=tmp_path / "v", progress=False)
    with caplog.at_level("WARNING", logger="steerlab.data.contrast"):
        vector = extract(args, lm=tiny_lm)
    warnings_ = [r for r in caplog.records if "balancing the answer letters dropped" in r.getMessage()]
    assert len(warnings_) == 1
    meta = vector.metadata["dataset"]
    assert (meta["size_before_balancing"], meta["size"]) == (5, 4)
    assert meta["letter_counts_before_balancing"] == dataset.letter_counts()
    assert meta["letter_counts"] == {"(A)": 2, "(B)": 2}
    direct = extract_caa(tiny_lm, dataset, [1], progress=False)
    assert direct.metadata["dataset"] == meta
    torch.testing.assert_close(direct.vectors[1], vector.vectors[1])


def test_generate_checks_the_vector_width_before_any_generation(tiny_lm, tmp_path, monkeypatch):
    import steerlab.evaluate
    from steerlab.steering.commands import GenerateArgs, generate

    SteeringVector({1: torch.ones(16)}).save(tmp_path / "narrow")

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking the vector")

    monkeypatch.setattr(steerlab.evaluate, "generate", no_generation)
    args = GenerateArgs(prompts=["Hi"], vector=tmp_path / "narrow", multiplier=1.0, progress=False)
    with pytest.raises(InvalidVectorError, match="width 16 .* width 32"):
        generate(args, lm=tiny_lm)


def test_demo_names_the_builtin_sentiment_data_however_it_is_given():
    from steerlab.data.sources import DataRef, load_dataset, load_word_lists
    from steerlab.steering.demo import SENTIMENT, DemoConfig

    pairs = load_dataset("builtin:sentiment", (PairedTexts,), "contrast", "the demo")
    prompts = load_dataset("builtin:sentiment-prompts", option="evaluation")
    words = load_word_lists("builtin:sentiment-words", "words")
    as_refs = DemoConfig(
        pairs=DataRef("builtin:sentiment"), prompts=DataRef("builtin:sentiment-prompts"), words=words
    )
    assert DemoConfig().behaviour(pairs, prompts, words) == SENTIMENT
    assert as_refs.behaviour(pairs, prompts, words) == SENTIMENT
    other_words = {"positive": ["good"], "negative": ["bad"]}
    assert DemoConfig(words=other_words).behaviour(pairs, prompts, other_words) != SENTIMENT
