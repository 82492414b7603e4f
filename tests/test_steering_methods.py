import importlib
import importlib.util

import numpy as np
import pytest
import torch

from steerlab.data import ABDataset, ABItem, PairedTexts, encode, format_prompt, locate_answers
from steerlab.errors import UserError
from steerlab.steering import (
    SteeringVector,
    VectorError,
    caa_items,
    extract_mean_difference,
    extract_pca_center,
    extract_pca_diff,
    extract_probe,
)
from steerlab.steering.methods import held_out_pairs, logistic_direction, pca_direction

LAYERS = [1, 2]  # not the last: its output_hidden_states entry is after the final norm
TEXTS = PairedTexts(
    [f"good {w} day" for w in ("sunny", "fine", "warm", "bright", "long", "calm", "happy", "lucky")],
    [f"bad {w} night" for w in ("rainy", "poor", "cold", "dark", "short", "wild", "sad", "grim")],
)


def _hand_activations(lm, texts: list[str], layer: int) -> np.ndarray:
    """Last-token activation after block `layer`, one text at a time, via output_hidden_states."""
    rows = []
    with torch.no_grad():
        for text in texts:
            out = lm.model(torch.tensor([encode(lm.tokenizer, text)]), output_hidden_states=True)
            rows.append(out.hidden_states[layer + 1][0, -1].numpy())
    return np.stack(rows)


def _first_pc(train: np.ndarray) -> np.ndarray:
    return np.linalg.svd(train - train.mean(0), full_matrices=False)[2][0]


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("method", ["pca-diff", "pca-center"])
def test_pca_directions_equal_numpy_svd_of_hand_captured_activations(tiny_lm, method):
    extract = extract_pca_diff if method == "pca-diff" else extract_pca_center
    vector = extract(tiny_lm, TEXTS, LAYERS, batch_size=3, progress=False)
    assert vector.metadata["method"] == method and vector.metadata["scale"] == "mean-difference-norm"
    for layer in LAYERS:
        pos = _hand_activations(tiny_lm, TEXTS.positive, layer)
        neg = _hand_activations(tiny_lm, TEXTS.negative, layer)
        if method == "pca-diff":
            expected = _first_pc(pos - neg)
        else:
            centre = (pos + neg) / 2
            expected = _first_pc(np.concatenate([pos - centre, neg - centre]))
        got = vector.vectors[layer].double().numpy()
        assert abs(_cos(got, expected)) > 1 - 1e-6
        # scaled to the mean difference's norm; positives project higher on average
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(pos.mean(0) - neg.mean(0)), rel=1e-5)
        assert (pos @ got).mean() > (neg @ got).mean()
        residual = (np.linalg.norm(pos, axis=1).mean() + np.linalg.norm(neg, axis=1).mean()) / 2
        assert vector.residual_norm(layer) == pytest.approx(residual, rel=1e-6)


def test_pca_direction_is_the_top_right_singular_vector_and_orientation_flips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5)) * np.array([5.0, 1, 1, 1, 1]) + 3.0
    got = pca_direction(torch.from_numpy(x)).numpy()
    assert abs(_cos(got, _first_pc(x))) == pytest.approx(1.0, abs=1e-12)
    assert abs(got[0]) > 0.9  # the high-variance axis


def test_swapping_sides_flips_pca_and_probe_vectors(tiny_lm):
    swapped = PairedTexts(TEXTS.negative, TEXTS.positive)
    for extract in (extract_pca_diff, extract_pca_center, extract_probe):
        a = extract(tiny_lm, TEXTS, [2], progress=False).vectors[2]
        b = extract(tiny_lm, swapped, [2], progress=False).vectors[2]
        torch.testing.assert_close(b, -a, rtol=1e-4, atol=1e-5)


def test_logistic_direction_maps_back_to_the_residual_basis():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)) * np.array([1, 10, 0.1, 1, 1, 3]) + 2.0
    y = (x[:, 0] + 0.3 * rng.normal(size=40) > 2.0).astype(int)
    w, b = logistic_direction(torch.from_numpy(x), torch.from_numpy(y), c=0.5)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000)).fit(x, y)
    np.testing.assert_allclose(x @ w.numpy() + b, pipeline.decision_function(x), rtol=1e-6, atol=1e-8)


def test_probe_finds_a_planted_direction_and_reports_held_out_accuracy(tiny_lm):
    # Synthetic: classes differ by 2 along e0 in 8-d Gaussian noise; the probe recovers e0.
    rng = np.random.default_rng(2)
    pos = rng.normal(size=(200, 8))
    neg = rng.normal(size=(200, 8))
    pos[:, 0] += 2.0
    x = torch.from_numpy(np.concatenate([pos, neg]))
    y = torch.cat([torch.ones(200), torch.zeros(200)]).long()
    w, b = logistic_direction(x, y)
    assert _cos(w.numpy(), np.eye(8)[0]) > 0.95

    vector = extract_probe(tiny_lm, TEXTS, LAYERS, test_fraction=0.25, progress=False)
    assert vector.metadata["method"] == "probe"
    assert vector.metadata["parameters"] == {"seed": 0, "c": 1.0, "test_fraction": 0.25}
    test = held_out_pairs(len(TEXTS), 0.25, 0)
    assert len(test) == 2
    train = [i for i in range(len(TEXTS)) if i not in test]
    for layer in LAYERS:
        pos_h = _hand_activations(tiny_lm, TEXTS.positive, layer)
        neg_h = _hand_activations(tiny_lm, TEXTS.negative, layer)
        got = vector.vectors[layer].double().numpy()
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(pos_h.mean(0) - neg_h.mean(0)), rel=1e-5)
        # the recorded accuracies are those of the probe fitted on the training pairs only
        xt = torch.from_numpy(np.concatenate([pos_h[train], neg_h[train]]))
        yt = torch.cat([torch.ones(len(train)), torch.zeros(len(train))]).long()
        w, b = logistic_direction(xt, yt)
        assert abs(_cos(got, w.numpy())) == pytest.approx(1.0, abs=1e-6)
        xh = np.concatenate([pos_h[test], neg_h[test]])
        yh = np.array([1] * len(test) + [0] * len(test))
        held = float(((xh @ w.numpy() + b > 0).astype(int) == yh).mean())
        assert vector.metadata["held_out_accuracy"][str(layer)] == pytest.approx(held)
        assert vector.metadata["train_accuracy"][str(layer)] == 1.0  # 32 dims, 12 points: separable
        assert (pos_h @ got).mean() > (neg_h @ got).mean()


def test_too_few_pairs_hold_nothing_out_and_identical_sides_fail(tiny_lm):
    assert held_out_pairs(3, 0.25, 0) == [] and len(held_out_pairs(4, 0.9, 0)) == 2
    small = PairedTexts(TEXTS.positive[:3], TEXTS.negative[:3])
    assert extract_probe(tiny_lm, small, [1], progress=False).metadata["held_out_accuracy"] == {"1": None}
    with pytest.raises(UserError, match="pca-diff: .*same activations"):
        extract_pca_diff(tiny_lm, PairedTexts(["ab", "cd"], ["ab", "cd"]), [1], progress=False)
    with pytest.raises(UserError, match="at least 2 pairs"):
        extract_pca_center(tiny_lm, PairedTexts(["ab"], ["cd"]), [1], progress=False)


# --- arithmetic ---------------------------------------------------------------------------------------


def _vec(values: dict[int, list[float]], method: str = "caa") -> SteeringVector:
    vectors = {layer: torch.tensor(v) for layer, v in values.items()}
    return SteeringVector(
        vectors,
        {
            "method": method,
            "layers": sorted(vectors),
            "norms": {str(k): float(v.norm()) for k, v in vectors.items()},
            "residual_norms": {str(k): 10.0 for k in vectors},
        },
    )


def test_vector_arithmetic_by_hand():
    a = _vec({1: [3.0, 4.0, 0.0], 2: [1.0, 0.0, 0.0]})
    b = _vec({1: [1.0, 0.0, 0.0], 2: [1.0, 1.0, 0.0]}, method="pca-diff")
    total = a + b
    assert total.vectors[1].tolist() == [4.0, 4.0, 0.0] and total.vectors[2].tolist() == [2.0, 1.0, 0.0]
    assert total.metadata["method"] == "sum" and total.metadata["operands"] == ["caa", "pca-diff"]
    assert (a - b).vectors[1].tolist() == [2.0, 4.0, 0.0]
    assert a.scaled(-2).vectors[1].tolist() == [-6.0, -8.0, 0.0]
    assert a.scaled(-2).norm(1) == pytest.approx(10.0)
    unit = a.normalised()
    torch.testing.assert_close(unit.vectors[1], torch.tensor([0.6, 0.8, 0.0]))
    assert unit.norm(2) == pytest.approx(1.0)
    ortho = a.orthogonalised(b)
    # layer 1: (3,4,0) minus its projection on (1,0,0); layer 2: (1,0,0) - 1/2 (1,1,0)
    torch.testing.assert_close(ortho.vectors[1], torch.tensor([0.0, 4.0, 0.0]))
    torch.testing.assert_close(ortho.vectors[2], torch.tensor([0.5, -0.5, 0.0]))
    assert ortho.metadata["norms"]["2"] == pytest.approx(0.5**0.5)
    # residual norms carry over, so fractions keep their meaning
    assert ortho.multiplier_for_fraction(1, 0.1) == pytest.approx(0.1 * 10.0 / 4.0)


def test_arithmetic_refuses_mismatched_vectors():
    a = _vec({1: [1.0, 0.0]})
    with pytest.raises(VectorError, match="same layers"):
        a + _vec({2: [1.0, 0.0]})
    with pytest.raises(VectorError, match="same layers"):
        a.orthogonalised(_vec({1: [1.0, 0.0, 0.0]}))
    with pytest.raises(VectorError, match="finite non-zero"):
        a.scaled(0.0)
    with pytest.raises(VectorError, match="all zeros"):
        a.orthogonalised(a.scaled(3.0))


def test_arithmetic_on_extracted_vectors_saves_and_loads(tiny_lm, tmp_path):
    caa = extract_mean_difference(tiny_lm, TEXTS, LAYERS, progress=False)
    pca = extract_pca_diff(tiny_lm, TEXTS, LAYERS, progress=False)
    ortho = caa.orthogonalised(pca)
    for layer in LAYERS:
        assert float(ortho.vectors[layer].double() @ pca.vectors[layer].double()) == pytest.approx(
            0, abs=1e-4
        )
    ortho.save(tmp_path / "o")
    loaded = SteeringVector.load(tmp_path / "o")
    assert loaded.metadata["method"] == "orthogonalised"


# --- agreement with repeng 0.4 --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "extract"), [("pca_diff", extract_pca_diff), ("pca_center", extract_pca_center)]
)
def test_pca_agrees_with_repeng(tiny_lm, repeng_extract, method, extract):
    entries = [repeng_extract.DatasetEntry(p, n) for p, n in zip(TEXTS.positive, TEXTS.negative, strict=True)]
    theirs = repeng_extract.read_representations(
        tiny_lm.model, tiny_lm.tokenizer, entries, hidden_layers=LAYERS, batch_size=4, method=method
    )
    ours = extract(tiny_lm, TEXTS, LAYERS, progress=False)
    for layer in LAYERS:
        cosine = _cos(ours.vectors[layer].numpy(), theirs[layer])
        print(f"repeng {method} layer {layer}: cosine {cosine:.6f}")
        assert cosine >= 0.99


def test_pca_diff_on_ab_items_reads_the_answer_letter(tiny_lm):
    items = []
    for i in range(6):
        match, other = ("(A)", "(B)") if i % 2 == 0 else ("(B)", "(A)")
        items.append(ABItem(f"Is {i} even?\n\nChoices:\n (A) yes\n (B) no", match, other))
    dataset = ABDataset(items, name="toy")
    vector = extract_pca_diff(tiny_lm, dataset, [2], progress=False)
    assert vector.metadata["read"] == "answer-letter"
    assert vector.metadata["dataset"]["letter_counts"] == {"(A)": 3, "(B)": 3}
    diffs = []
    for item in caa_items(dataset):
        prompt = format_prompt(tiny_lm.tokenizer, item.question)
        where = locate_answers(tiny_lm.tokenizer, prompt, [item.matching, item.not_matching])
        with torch.no_grad():
            pos, neg = (
                tiny_lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[3][
                    0, where.position
                ]
                for ids in where.option_ids
            )
        diffs.append((pos - neg).numpy())
    assert abs(_cos(vector.vectors[2].numpy(), _first_pc(np.stack(diffs)))) > 1 - 1e-6


def test_extract_command_refuses_an_unknown_method_and_a_missing_sklearn_before_loading(
    tmp_path, monkeypatch
):
    from steerlab.steering.commands import ExtractArgs, extract

    def args(method: str) -> ExtractArgs:
        return ExtractArgs(
            model="no-such-model", data="builtin:sentiment", layers=[1], out=tmp_path / "v", method=method
        )

    with pytest.raises(UserError, match="--method: expected one of mean-diff, pca-diff, pca-center, probe"):
        extract(args("svd"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a)
    )
    with pytest.raises(UserError, match="--method probe: needs scikit-learn"):
        extract(args("probe"))
