import csv
import io

import pytest
import torch

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
