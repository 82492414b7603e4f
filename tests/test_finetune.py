"""Trained interventions (bias vector, LoRA) and their comparison with steering, on tiny models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.cli import main
from steerlab.data import PairedTexts, encode, format_prompt, load_builtin
from steerlab.errors import UserError
from steerlab.evaluate import prepare_neutral
from steerlab.evaluate.probability import WordPreference, word_preference
from steerlab.finetune.commands import CompareArgs, run_compare
from steerlab.finetune.compare import compare_layer
from steerlab.finetune.report import markdown_table, write_report
from steerlab.finetune.train import (
    Replies,
    TrainConfig,
    TrainedIntervention,
    behaviour_loss,
    lora_model,
    reply_ids,
    reply_nll,
    train_bias,
    train_lora,
)
from steerlab.hooks import add
from steerlab.models import wrap

PAIRS = PairedTexts(
    ["I love this sunny day", "what a great meal", "she is so kind", "a wonderful gift"],
    ["I hate this rainy day", "what an awful meal", "she is so cruel", "a dreadful gift"],
    name="toy",
)


def _tokens(lm, texts):
    return [encode(lm.tokenizer, t) for t in texts]


def _exact_float64_lm():
    """The tiny Llama computing every step in float64 (sdpa attention; torch's RMSNorm in place of Hugging
    Face's, which normalises in float32), so finite differences are exact to ~1e-10."""
    model = tiny_model("llama", attn="sdpa")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                norm = torch.nn.RMSNorm(32, eps=child.variance_epsilon, dtype=torch.float64)
                norm.weight.data.copy_(child.weight.data)
                setattr(parent, name, norm)
    return wrap(model, char_tokenizer(), name="tiny-llama-exact")


@pytest.mark.parametrize("loss", ["positive", "contrast"])
def test_bias_gradient_matches_finite_differences(loss):
    tiny_lm = _exact_float64_lm()
    pos, neg = _tokens(tiny_lm, PAIRS.positive[:2]), _tokens(tiny_lm, PAIRS.negative[:2])
    torch.manual_seed(1)
    bias = (0.1 * torch.randn(32, dtype=torch.float64)).requires_grad_(True)

    def value(b):
        with add(tiny_lm, {1: b}):
            return behaviour_loss(tiny_lm, pos, neg, loss)[0]

    (grad,) = torch.autograd.grad(value(bias), bias)
    eps = 1e-6
    with torch.no_grad():
        for i in (0, 5, 17, 31):
            step = torch.zeros_like(bias)
            step[i] = eps
            numeric = (value(bias + step) - value(bias - step)) / (2 * eps)
            assert float(grad[i]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-9)
    assert float(grad.norm()) > 0


def _expected_lora_params(rank: int, target: str) -> int:
    # tiny llama: hidden 32, 4 heads of 8, 2 key-value heads (k, v: 32 -> 16), intermediate 64
    attn = rank * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))
    mlp = rank * 3 * (32 + 64)
    return {"attn": attn, "mlp": mlp, "both": attn + mlp}[target]


@pytest.mark.parametrize(("rank", "target"), [(1, "attn"), (3, "mlp"), (2, "both")])
def test_lora_counts_parameters_and_leaves_the_model_alone(tiny_lm, rank, target):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    modules = [name for name, _ in tiny_lm.model.named_modules()]
    result, tuned = train_lora(
        tiny_lm, PAIRS, TrainConfig(layer=2, steps=3), rank=rank, target=target, progress=False
    )
    assert result.trainable_params == _expected_lora_params(rank, target)
    assert sum(t.numel() for t in result.tensors.values()) == result.trainable_params
    assert all(".layers.2." in key for key in result.tensors)
    after = tiny_lm.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert [name for name, _ in tiny_lm.model.named_modules()] == modules
    assert any(p.requires_grad for p in tiny_lm.model.parameters())  # flags restored
    # the trained copy differs from the base model (B was updated from zero)
    ids = torch.tensor([encode(tiny_lm.tokenizer, PAIRS.positive[0])])
    with torch.no_grad():
        assert not torch.allclose(tuned.model(input_ids=ids).logits, tiny_lm.model(input_ids=ids).logits)


def test_bias_training_lowers_the_loss_and_leaves_weights_alone(tiny_lm):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    result = train_bias(tiny_lm, PAIRS, TrainConfig(layer=1, steps=20, lr=0.05), progress=False)
    assert result.trainable_params == 32 and result.tensors["bias"].shape == (32,)
    assert result.losses[-1] < result.losses[0]
    assert result.tokens_seen > 0
    assert all(torch.equal(before[k], v) for k, v in tiny_lm.model.state_dict().items())
    assert all(p.requires_grad for p in tiny_lm.model.parameters())


def test_seeds_make_runs_reproducible(tiny_lm):
    config = TrainConfig(layer=1, steps=4, batch_size=2, seed=3)
    a, b = (train_bias(tiny_lm, PAIRS, config, progress=False) for _ in range(2))
    assert a.losses == b.losses and torch.equal(a.tensors["bias"], b.tensors["bias"])
    c = train_bias(tiny_lm, PAIRS, TrainConfig(layer=1, steps=4, batch_size=2, seed=4), progress=False)
    assert c.losses != a.losses
    (la, _), (lb, _) = (train_lora(tiny_lm, PAIRS, config, rank=2, progress=False) for _ in range(2))
    assert la.losses == lb.losses
    assert all(torch.equal(la.tensors[k], lb.tensors[k]) for k in la.tensors)


def test_results_save_and_load(tiny_lm, tmp_path):
    bias = train_bias(tiny_lm, PAIRS, TrainConfig(layer=1, steps=2), progress=False)
    bias.save(tmp_path / "bias")
    loaded = TrainedIntervention.load(tmp_path / "bias")
    assert loaded.kind == "bias" and loaded.losses == bias.losses and loaded.config == bias.config
    assert torch.equal(loaded.tensors["bias"], bias.tensors["bias"])

    lora, tuned = train_lora(tiny_lm, PAIRS, TrainConfig(layer=1, steps=2), rank=2, progress=False)
    lora.save(tmp_path / "lora")
    assert (tmp_path / "lora.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    again = TrainedIntervention.load(tmp_path / "lora")
    _, reloaded = lora_model(tiny_lm, again.tensors, 1, 2, "both")
    ids = torch.tensor([encode(tiny_lm.tokenizer, PAIRS.positive[1])])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(input_ids=ids).logits, tuned.model(input_ids=ids).logits)


def test_bad_inputs_name_the_argument(tiny_lm, tmp_path):
    with pytest.raises(UserError, match="--steps"):
        train_bias(tiny_lm, PAIRS, TrainConfig(layer=1, steps=0), progress=False)
    with pytest.raises(UserError, match="--rank"):
        train_lora(tiny_lm, PAIRS, TrainConfig(layer=1), rank=0, progress=False)
    with pytest.raises(UserError, match="--layer 4"):
        train_bias(tiny_lm, PAIRS, TrainConfig(layer=4), progress=False)
    with pytest.raises(UserError, match="no paired texts"):
        train_bias(tiny_lm, PairedTexts([], []), TrainConfig(layer=1), progress=False)
    with pytest.raises(UserError, match="--target"):
        train_lora(tiny_lm, PAIRS, TrainConfig(layer=1), target="ffn", progress=False)
    for field, value in (("rank", 0), ("steps", 0), ("batch_size", 0), ("lr", 0.0), ("layers", "")):
        with pytest.raises(UserError, match="--" + field.replace("_", "-")):
            CompareArgs(out=tmp_path / "x", **{field: value})
    with pytest.raises(UserError, match="--layers: layer 9 is out of range"):
        run_compare(CompareArgs(out=tmp_path / "x", layers="9", progress=False), lm=tiny_lm)


def test_cli_rejects_bad_rank_before_loading(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "o"), "--rank", "0", "--model", "no-such-model"]) == 2
    assert "--rank" in capsys.readouterr().err


def test_compare_layer_rows_and_report(tiny_lm, tmp_path):
    prompts = ["It was a", "The day felt", "Our trip was", "That film is"]
    prepared = WordPreference(_tokens(tiny_lm, prompts), [70, 71], [72])
    metric = lambda lm: {"score": word_preference(lm, prepared)}  # noqa: E731
    neutral = prepare_neutral(tiny_lm, load_builtin("neutral-text")[:3])
    config = TrainConfig(layer=1, steps=3)
    rows, results = compare_layer(tiny_lm, PAIRS, metric, neutral, config, rank=2, progress=False)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"unsteered", "caa@0.1", "caa@|bias|", "bias", "lora-r2-both"}
    assert set(results) == {"caa", "bias-seed0", "lora-seed0"}
    bias = results["bias-seed0"].tensors["bias"]
    caa = results["caa"].vectors[1].float()
    assert by["bias"]["cos_with_caa"] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(bias, caa, dim=0))
    )
    assert by["caa@|bias|"]["added_norm"] == pytest.approx(float(bias.norm()), rel=1e-5)
    assert by["bias"]["trainable_params"] == 32 and by["lora-r2-both"]["trainable_params"] == 2 * 512
    for row in rows:
        assert row["ci_low"] <= row["effect"] <= row["ci_high"]
    # the bias row's effect is the mean per-prompt shift from the unsteered scores
    with torch.no_grad():
        base = metric(tiny_lm)["score"]
        with add(tiny_lm, {1: bias}):
            steered = metric(tiny_lm)["score"]
    assert by["bias"]["effect"] == pytest.approx(float((steered - base).mean()), abs=1e-9)
    summary = dict(
        title="t", steps=3, batch_size=4, lr=0.01, loss="positive", seed=0, behaviour="b", n_pairs_train=4,
        n_prompts_test=4,
    )  # fmt: skip
    write_report(tmp_path, rows, summary)
    assert (tmp_path / "effects.png").stat().st_size > 0 and (tmp_path / "report.html").is_file()
    assert markdown_table(rows).count("\n") == len(rows) + 2


def test_full_mlp_tunes_exactly_the_layers_mlp_on_a_copy(tiny_lm):
    from steerlab.finetune.train import train_mlp

    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    result, tuned = train_mlp(tiny_lm, PAIRS, TrainConfig(layer=2, steps=3, lr=0.01), progress=False)
    assert result.trainable_params == 3 * 32 * 64  # gate, up, down of a 32 -> 64 -> 32 MLP, no biases
    assert sorted(result.tensors) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    assert all(torch.equal(before[k], v) for k, v in tiny_lm.model.state_dict().items())
    changed = {k for k, v in tuned.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {f"model.layers.2.mlp.{name}" for name in result.tensors}
    assert result.losses[-1] < result.losses[0]


def test_compare_layer_with_full_mlp_and_two_seeds(tiny_lm):
    prompts = ["It was a", "The day felt"]
    prepared = WordPreference(_tokens(tiny_lm, prompts), [70, 71], [72])
    metric = lambda lm: {"score": word_preference(lm, prepared)}  # noqa: E731
    neutral = prepare_neutral(tiny_lm, load_builtin("neutral-text")[:2])
    rows, results = compare_layer(
        tiny_lm, PAIRS, metric, neutral, TrainConfig(layer=2, steps=2), rank=1, seeds=[3, 4], full_mlp=True,
        progress=False,
    )  # fmt: skip
    assert [r["method"] for r in rows] == ["unsteered", "caa@0.1"] + [
        "caa@|bias|",
        "bias",
        "lora-r1-both",
        "mlp-full",
    ] * 2
    assert set(results) == {"caa"} | {f"{k}-seed{s}" for k in ("bias", "lora", "mlp") for s in (3, 4)}
    full = [r for r in rows if r["method"] == "mlp-full"]
    assert [r["seed"] for r in full] == [3, 4] and all(r["trainable_params"] == 3 * 32 * 64 for r in full)
    assert results["bias-seed3"].config["seed"] == 3 and results["lora-seed4"].config["seed"] == 4


def test_reply_loss_is_the_nll_of_the_reply_tokens_only():
    lm = _exact_float64_lm()
    prompts, replies = ["hi there", "tell me"], [" no way", " sure thing ok"]
    sequences = [reply_ids(lm, p, r) for p, r in zip(prompts, replies)]
    for (ids, keep), prompt in zip(sequences, prompts):
        assert ids[:keep] == encode(lm.tokenizer, format_prompt(lm.tokenizer, prompt))
    value, tokens = reply_nll(lm, sequences)
    expected, count = [], 0
    with torch.no_grad():
        for ids, keep in sequences:  # one unpadded forward per sequence
            logp = lm.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            expected += [-logp[j - 1, ids[j]] for j in range(keep, len(ids))]
            count += len(ids) - keep
    assert tokens == count == sum(len(r) for r in replies)  # one character per token
    assert float(value) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-9)

    torch.manual_seed(2)
    bias = (0.1 * torch.randn(32, dtype=torch.float64)).requires_grad_(True)

    def loss(b):
        with add(lm, {1: b}):
            return reply_nll(lm, sequences)[0]

    (grad,) = torch.autograd.grad(loss(bias), bias)
    step = torch.zeros_like(bias)
    step[3] = 1e-6
    with torch.no_grad():
        numeric = (loss(bias + step) - loss(bias - step)) / 2e-6
    assert float(grad[3]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-9)


def test_replies_need_the_reply_loss(tiny_lm):
    replies = Replies(["a b"], [" no"], [" yes"])
    with pytest.raises(UserError, match="--loss positive: a target model's replies train with --loss reply"):
        train_bias(tiny_lm, replies, TrainConfig(layer=1, loss="positive"), progress=False)
    with pytest.raises(UserError, match="no prompts with replies"):
        train_bias(tiny_lm, Replies([], [], []), TrainConfig(layer=1, loss="reply"), progress=False)


def test_compare_on_a_target_model(tiny_lm, tmp_path, monkeypatch):
    """--organism: the target's replies are generated once (cached), and rows carry the control score."""
    target = tmp_path / "target"
    tiny_model("llama", dtype=torch.float32).save_pretrained(target)
    char_tokenizer().save_pretrained(target)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("harmful_train", "harmless_train", "harmful_test", "harmless_test"):
        (data / f"{split}.json").write_text(json.dumps([{"instruction": f"{split} {i}"} for i in range(3)]))
    args = CompareArgs(
        out=tmp_path / "out", layers="1", organism=str(target), organism_data=str(data), steps=2,
        train_limit=2, test_limit=2, reply_tokens=3, progress=False, rank=2,
    )  # fmt: skip
    result = run_compare(args, lm=tiny_lm)
    assert result["loss"] == "reply" and result["n_pairs_train"] == 4
    by = {r["method"]: r for r in result["rows"]}
    assert all(0 <= by[m]["control"] <= 1 for m in ("unsteered", "bias", "lora-r2-both"))
    saved = json.loads((tmp_path / "out" / "replies.json").read_text())
    assert len(saved["replies"]) == 4 and saved["key"]["prompts"][2] == "harmless_train 0"
    assert saved["key"]["target"] == str(target) and result["behaviour"].startswith("target: ")

    import steerlab.finetune.commands as commands

    monkeypatch.setattr(commands, "target_replies", lambda *a, **k: pytest.fail("replies regenerated"))
    run_compare(dataclasses.replace(args, out=tmp_path / "out", layers=[1]), lm=tiny_lm)
    with pytest.raises(UserError, match="no harmless_test.json"):
        (data / "harmless_test.json").unlink()
        run_compare(args, lm=tiny_lm)
    with pytest.raises(UserError, match="--organism and --data"):
        CompareArgs(out=tmp_path / "x", organism="m", data="caa:x")
