"""Real-behaviour checks on the embedded SmolLM2-135M-Instruct (slow)."""

import json

import pytest
import torch

from steerlab.data import load_builtin
from steerlab.evaluate import generate
from steerlab.hooks import Positions
from steerlab.steering import extract_caa, extract_mean_difference
from steerlab.steering.demo import DemoConfig, run_demo
from steerlab.steering.report import summary_checks

pytestmark = pytest.mark.slow


def test_steered_generation_same_tokens_with_and_without_cache(smollm2):
    """24 greedy decode steps, a left-padded batch of two, steering from the prompt's last two tokens on."""
    vector = extract_mean_difference(smollm2, load_builtin("sentiment"), [12], progress=False)
    prompts = ["The weather this weekend was", "I think that my new neighbours are really"]
    m = vector.multiplier_for_fraction(12, 0.1)
    kwargs = dict(chat=False, max_new_tokens=24, min_new_tokens=24, batch_size=2)
    outputs = {}
    with vector.apply(smollm2, layer=12, multiplier=-m, positions=Positions.from_position(-2)):
        for cache in (True, False):
            outputs[cache] = generate(smollm2, prompts, use_cache=cache, **kwargs)
    assert outputs[True] == outputs[False]
    assert outputs[True] != generate(smollm2, prompts, **kwargs)


def test_caa_on_ab_items_reads_the_letter_and_balances(smollm2):
    dataset = load_builtin("sentiment-ab")[:12]
    vector = extract_caa(smollm2, dataset, [10, 14], progress=False)
    counts = vector.metadata["dataset"]["letter_counts"]
    assert counts["(A)"] == counts["(B)"]
    assert 0 < vector.norm(14) < 0.5 * vector.residual_norm(14)


def test_demo_shows_a_real_effect(smollm2, tmp_path):
    config = DemoConfig(
        layers=(12, 16, 20),
        fractions=(-0.1, -0.05, 0.05, 0.1),
        n_generations=2,
        max_new_tokens=8,
        progress=False,
    )
    summary = run_demo(tmp_path, config, lm=smollm2)
    failed = [text for ok, text in summary_checks(summary) if not ok]
    assert not failed, failed
    assert summary["test_p_minus"] < summary["test_p_base"] < summary["test_p_plus"]
    html = (tmp_path / "report.html").read_text()
    assert "<img" in html and "http://" not in html and "https://" not in html  # self-contained, no CDN
    assert json.loads((tmp_path / "summary.json").read_text())["layer"] in (12, 16, 20)
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 1 + 3 + 3 * 4 * 2 + 1 + 4 * 2
    torch.testing.assert_close(
        torch.tensor(summary["test_effect"]), torch.tensor(summary["test_p_plus"] - summary["test_p_minus"])
    )


def test_the_help_examples_for_sentiment_run_as_written(tmp_path, monkeypatch, capsys):
    """`steerlab extract` and `steerlab sweep` exactly as `steerlab --help` shows them (fractions -0.1,0.1)."""
    import csv
    import shlex

    from steerlab.cli import EXAMPLES, main

    monkeypatch.chdir(tmp_path)
    lines = [line.strip() for line in EXAMPLES.splitlines() if line.strip().startswith("steerlab ")]
    extract = next(line for line in lines if line.startswith("steerlab extract --data builtin:sentiment "))
    sweep = next(line for line in lines if line.startswith("steerlab sweep "))
    assert "--fractions -0.1,0.1" in sweep
    for line in (extract, sweep):
        assert main(["--quiet", *shlex.split(line)[1:]]) == 0, line
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert len(rows) == 2 + 2 * 2 * 2 and {r["fraction"] for r in rows} == {"0.0", "-0.1", "0.1"}
    steer = {(r["layer"], r["fraction"]): float(r["score"]) for r in rows if r["vector"] == "steering"}
    assert steer["16", "0.1"] > steer["16", "-0.1"]  # the sentiment vector moves p(positive) the right way
