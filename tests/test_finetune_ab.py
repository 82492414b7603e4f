"""The A/B training loss (-log p(matching letter)) and `steerlab compare` on A/B items, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from steerlab.cli import main
from steerlab.data import ABDataset, ABItem, encode, format_prompt
from steerlab.errors import UserError
from steerlab.evaluate import ab_scores, prepare_ab
from steerlab.finetune import compare as compare_module
from steerlab.finetune.commands import CompareArgs, run_compare
from steerlab.finetune.report import aggregate
from steerlab.finetune.train import TrainConfig, batch_loss_function, train_bias, train_lora
from steerlab.hooks import add
from test_finetune import PAIRS, _exact_float64_lm

QUESTIONS = [
    ("Is the sky blue?", "yes", "no"),
    ("Pick a number", "one", "two"),
    ("Do you like tea or coffee?", "tea", "coffee"),
    ("Which is bigger?", "sun", "moon"),
    ("Say it", "hi", "bye"),
    ("Choose", "red", "green"),
    ("Well?", "up", "down"),
    ("Now which?", "left", "right"),
]


def _items(n: int = 8) -> ABDataset:
    """Two-option items, matching letters alternating (A), (B)."""
    items = []
    for i, (question, first, second) in enumerate((QUESTIONS * 4)[:n]):
        text = f"{question} {i}\n\nChoices:\n (A) {first}\n (B) {second}"
        matching = "(A)" if i % 2 == 0 else "(B)"
        items.append(ABItem(text, matching, "(B)" if matching == "(A)" else "(A)"))
    return ABDataset(items, "toy-ab")


def _write_ab(
    path, items: ABDataset, keys=("question", "answer_matching_behavior", "answer_not_matching_behavior")
):
    records = [
        dict(zip(keys, (item.question, item.matching, item.not_matching), strict=True)) for item in items
    ]
    path.write_text(json.dumps(records))
    return path


def test_ab_loss_is_minus_log_p_of_the_matching_letter(tiny_lm):
    items = _items(3)  # different lengths: the batch is padded
    _, batch_loss = batch_loss_function(tiny_lm, items, "ab")
    value, predicted = batch_loss([0, 1, 2])
    assert predicted == 3
    expected = []
    with torch.no_grad():
        for item in items:
            # by hand: the chat-formatted question followed by "(" predicts the letter (one char per token)
            ids = encode(tiny_lm.tokenizer, format_prompt(tiny_lm.tokenizer, item.question) + "(")
            logprobs = tiny_lm.model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            expected.append(-logprobs[tiny_lm.tokenizer.convert_tokens_to_ids(item.matching[1])])
    assert float(value) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-10)
    single, _ = batch_loss([1])
    assert float(single) == pytest.approx(float(expected[1]), rel=1e-10)


def test_ab_bias_gradient_matches_finite_differences():
    lm = _exact_float64_lm()
    _, batch_loss = batch_loss_function(lm, _items(3), "ab")
    torch.manual_seed(2)
    bias = (0.1 * torch.randn(32, dtype=torch.float64)).requires_grad_(True)

    def value(b):
        with add(lm, {2: b}):
            return batch_loss([0, 1, 2])[0]

    (grad,) = torch.autograd.grad(value(bias), bias)
    eps = 1e-6
    with torch.no_grad():
        for i in (0, 7, 19, 31):
            step = torch.zeros_like(bias)
            step[i] = eps
            numeric = (value(bias + step) - value(bias - step)) / (2 * eps)
            assert float(grad[i]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-9)
    assert float(grad.norm()) > 0


def test_ab_training_raises_p_matching_and_is_reproducible(tiny_lm):
    items = ABDataset([item for item in _items(16) if item.matching == "(A)"])  # learnable by one vector
    config = TrainConfig(layer=1, steps=15, lr=0.05, batch_size=4, loss="ab")
    result = train_bias(tiny_lm, items, config, progress=False)
    assert result.losses[-1] < result.losses[0] and result.tokens_seen == 15 * 4
    again = train_bias(tiny_lm, items, config, progress=False)
    assert torch.equal(result.tensors["bias"], again.tensors["bias"])
    prepared = prepare_ab(tiny_lm, items)
    with torch.no_grad():
        before = ab_scores(tiny_lm, prepared).p_matching.mean()
        with add(tiny_lm, {1: result.tensors["bias"]}):
            after = ab_scores(tiny_lm, prepared).p_matching.mean()
    assert after > before
    lora, _ = train_lora(tiny_lm, items, config, rank=2, progress=False)
    assert lora.losses[-1] < lora.losses[0]


def test_losses_must_suit_the_data(tiny_lm):
    with pytest.raises(UserError, match="--loss positive: A/B items train with --loss ab"):
        train_bias(tiny_lm, _items(4), TrainConfig(layer=1, loss="positive"), progress=False)
    with pytest.raises(UserError, match="--loss ab: paired texts"):
        train_bias(tiny_lm, PAIRS, TrainConfig(layer=1, loss="ab"), progress=False)
    with pytest.raises(UserError, match="--data: no A/B items"):
        train_lora(tiny_lm, ABDataset([]), TrainConfig(layer=1, loss="ab"), progress=False)


def test_compare_on_ab_items_bad_inputs(tiny_lm, tmp_path):
    data = _write_ab(tmp_path / "ab.json", _items(8))
    no_answers = tmp_path / "questions.json"
    no_answers.write_text(json.dumps([{"question": item.question} for item in _items(4)]))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="--data: .*holds prompts"):
        run_compare(CompareArgs(out=out, data=str(no_answers), progress=False), lm=tiny_lm)
    with pytest.raises(UserError, match="--loss contrast"):
        run_compare(CompareArgs(out=out, data=str(data), loss="contrast", progress=False), lm=tiny_lm)
    with pytest.raises(UserError, match="--layers: layer 7 is out of range"):
        run_compare(CompareArgs(out=out, data=str(data), layers="7", progress=False), lm=tiny_lm)
    with pytest.raises(UserError, match="--test-data"):
        CompareArgs(out=out, test_data=str(data))
    for field, value in (("repeats", 0), ("train_limit", 0), ("capability_limit", 0)):
        with pytest.raises(UserError, match="--" + field.replace("_", "-")):
            CompareArgs(out=out, **{field: value})
    assert not out.exists()


def test_cli_rejects_an_ab_file_without_answers_before_loading(tmp_path, capsys):
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"question": "Why?"}]))
    argv = ["compare", "--out", str(tmp_path / "o"), "--data", str(questions), "--model", "no-such-model"]
    assert main(argv) == 2
    assert "--data" in capsys.readouterr().err


def test_compare_on_ab_items_end_to_end_and_resume(tiny_lm, tmp_path, monkeypatch):
    train = _write_ab(tmp_path / "train.json", _items(8))
    test = _write_ab(tmp_path / "test.json", ABDataset(_items(12).items[8:]))
    mmlu = _write_ab(tmp_path / "mmlu.json", _items(6), keys=("prompt", "correct", "incorrect"))
    args = CompareArgs(
        out=tmp_path / "out", data=str(train), test_data=str(test), layers="1,2", steps=3, batch_size=2,
        rank=2, repeats=2, capability=str(mmlu), capability_limit=4, progress=False,
    )  # fmt: skip
    result = run_compare(args, lm=tiny_lm)
    assert result["loss"] == "ab" and result["seeds"] == [0, 1]
    rows = result["rows"]
    methods = [r["method"] for r in rows if r["layer"] == 1]
    assert methods == ["unsteered", "caa@0.1"] + ["caa@|bias|", "bias", "lora-r2-both"] * 2
    assert all(r["capability"] is not None and 0 <= r["capability"] <= 1 for r in rows)
    # the bias row's effect is the mean shift of p(matching) on the test items, by hand with the saved bias
    from steerlab.finetune.train import TrainedIntervention

    bias = TrainedIntervention.load(tmp_path / "out" / "layer2-bias-seed1").tensors["bias"]
    prepared = prepare_ab(tiny_lm, ABDataset(_items(12).items[8:]))
    with torch.no_grad():
        base = ab_scores(tiny_lm, prepared).p_matching
        with add(tiny_lm, {2: bias}):
            steered = ab_scores(tiny_lm, prepared).p_matching
    row = next(r for r in rows if r["layer"] == 2 and r["method"] == "bias" and r["seed"] == 1)
    assert row["effect"] == pytest.approx(float((steered - base).mean()), abs=1e-9)
    assert row["tokens"] == 3 * 2 and row["trainable_params"] == 32
    merged = {(r["layer"], r["method"]): r for r in aggregate(rows)}
    seeds = [r["effect"] for r in rows if r["layer"] == 2 and r["method"] == "bias"]
    assert merged[2, "bias"]["seeds"] == 2
    assert merged[2, "bias"]["effect"] == pytest.approx(sum(seeds) / 2)
    assert merged[2, "bias"]["effect_spread"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2)
    for name in ("effects", "layers", "tradeoff"):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 0
    assert "Mean over seeds" in (tmp_path / "out" / "report.md").read_text()

    # a rerun with the same settings resumes: nothing is trained again
    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(compare_module, "train_bias", refuse)
    again = run_compare(args, lm=tiny_lm)
    assert again["rows"] == json.loads(json.dumps(rows))
