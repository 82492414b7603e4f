import csv
import io

import pytest
import torch

from steerlab.errors import UserError
from steerlab.evaluate import prepare_neutral
from steerlab.steering import SteeringVector
from steerlab.steering.sweep import Grid, choose_setting, rows_to_csv, sweep


def _vector():
    return SteeringVector(
        {1: torch.randn(32, dtype=torch.float64), 2: torch.randn(32, dtype=torch.float64)},
        {"residual_norms": {"1": 10.0, "2": 20.0}},
    )


def test_sweep_rows_controls_and_multipliers(tiny_lm):
    calls = []

    def metric(lm):
        ids = torch.tensor([[5, 6, 7, 8]])
        logits = lm.model(ids).logits[0, -1]
        calls.append(1)
        return {"score": logits[:4].softmax(-1)}

    vector = _vector()
    neutral = prepare_neutral(tiny_lm, ["a b c d e"])
    rows = sweep(tiny_lm, vector, metric, Grid([1, 2], [-0.1, 0.1]), neutral=neutral, progress=False)
    assert len(rows) == 2 + 2 * 2 * 2 and len(calls) == 1 + 8
    base = [r for r in rows if r["vector"] == "none"]
    assert {r["layer"] for r in base} == {1, 2} and all(r["kl"] == 0 for r in base)
    for r in rows:
        if r["vector"] != "none":
            expected = abs(r["fraction"]) * (10.0 if r["layer"] == 1 else 20.0)
            assert r["added_norm"] == pytest.approx(expected, rel=1e-5)
            assert r["kl"] > 0
    parsed = list(csv.DictReader(io.StringIO(rows_to_csv(rows))))
    assert len(parsed) == len(rows) and parsed[0]["split"] == "validation"


def _row(vector, layer, fraction, score, ppl=10.0):
    return {"vector": vector, "layer": layer, "fraction": fraction, "score": score, "perplexity": ppl}


def test_choose_setting_respects_perplexity_and_prefers_small_fractions():
    rows = [_row("none", 1, 0, 0.5), _row("none", 2, 0, 0.5)]
    rows += [_row("steering", 1, 0.1, 0.9), _row("steering", 1, -0.1, 0.1, ppl=13.0)]  # effect .8, ppl +30%
    rows += [_row("steering", 2, 0.1, 0.8), _row("steering", 2, -0.1, 0.2)]  # effect .6
    rows += [_row("steering", 2, 0.2, 0.8), _row("steering", 2, -0.2, 0.2)]  # same effect, larger
    choice = choose_setting(rows, max_perplexity_increase=0.2)
    assert (choice.layer, choice.fraction) == (2, 0.1) and choice.effect == pytest.approx(0.6)
    assert choose_setting(rows, max_perplexity_increase=0.5).layer == 1


def test_grid_takes_fractions_or_raw_multipliers():
    vector = _vector()
    by_fraction = Grid([1, 2], [-0.1, 0.0, 0.1]).settings(vector)
    assert [(layer, f) for layer, f, _ in by_fraction] == [(1, -0.1), (1, 0.1), (2, -0.1), (2, 0.1)]
    assert by_fraction[1][2] == pytest.approx(0.1 * 10.0 / vector.norm(1))
    raw = Grid([2], multipliers=[-3.0, 3.0]).settings(vector)
    assert [m for _, _, m in raw] == [-3.0, 3.0]
    assert raw[1][1] == pytest.approx(3.0 * vector.norm(2) / 20.0)
    with pytest.raises(UserError, match="either fractions or multipliers"):
        Grid([1], [0.1], [2.0])
    with pytest.raises(UserError, match="either fractions or multipliers"):
        Grid([1])


def test_sweep_with_raw_multipliers(tiny_lm):
    def metric(lm):
        return {"score": lm.model(torch.tensor([[5, 6, 7]])).logits[0, -1, :4].softmax(-1)}

    vector = _vector()
    rows = sweep(tiny_lm, vector, metric, Grid([1], multipliers=[-2.0, 2.0]), progress=False)
    steered = [r for r in rows if r["vector"] == "steering"]
    assert [r["multiplier"] for r in steered] == [-2.0, 2.0]
    assert steered[1]["added_norm"] == pytest.approx(2.0 * vector.norm(1))
    assert steered[1]["fraction"] == pytest.approx(2.0 * vector.norm(1) / 10.0)
