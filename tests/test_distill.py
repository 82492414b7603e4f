"""Distilling a system prompt into an injection: exact zero loss for identical teacher and student,
gradients against finite differences (float64), seeded reproducibility, checkpoint/resume, the ActAdd
baseline's norm matching, saving, and clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

import steerlab.finetune.distill as distill_module
from conftest import char_tokenizer, tiny_model
from steerlab.cli import main
from steerlab.errors import UserError
from steerlab.finetune.commands import DistillArgs, run_distill
from steerlab.finetune.distill import (
    DistillConfig,
    Distilled,
    actadd_injection,
    check_prompts,
    distill,
    evaluate_kl,
    read_system_prompt,
    student_kl,
    teacher_targets,
    tokens_saved,
)
from steerlab.hooks import add
from steerlab.models import wrap

SYSTEM = "Talk like a pirate."
PROMPTS = ["Why is the sky blue?", "Name a fruit.", "How are you?", "Say hi."]


@pytest.fixture
def lm():
    """A tiny Llama computing every step in float64, with a character tokenizer: sdpa attention (eager
    runs its softmax in float32 and gives NaN under left padding) and torch's RMSNorm in place of Hugging
    Face's (which normalises in float32), so finite differences are exact to ~1e-10."""
    model = tiny_model("llama", attn="sdpa")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                norm = torch.nn.RMSNorm(32, eps=child.variance_epsilon, dtype=torch.float64)
                norm.weight.data.copy_(child.weight.data)
                setattr(parent, name, norm)
    return wrap(model, char_tokenizer(), name="tiny-llama")


@pytest.fixture
def targets(lm):
    return teacher_targets(lm, SYSTEM, PROMPTS, reply_tokens=5, progress=False)


def test_targets_align_on_the_reply(lm, targets):
    tok = lm.tokenizer
    for i, reply in enumerate(targets.replies):
        assert 1 <= len(reply) <= 5 and targets.teacher_logprobs[i].shape == (len(reply), 128)
        start = targets.starts[i]
        assert targets.student_ids[i][start + 1 :] == reply[:-1]  # the student is forced on the same reply
        assert tok.decode(targets.student_ids[i][: start + 1]).endswith("assistant: ")
        assert SYSTEM not in tok.decode(targets.student_ids[i])
    assert tokens_saved(lm, SYSTEM, PROMPTS) == 1 + len("system: " + SYSTEM + "\n")  # <s> is one token


def test_loss_and_gradient_are_zero_when_teacher_is_the_student(lm):
    same = teacher_targets(lm, None, PROMPTS, reply_tokens=5, progress=False)
    vector = torch.zeros(32, dtype=torch.float64, requires_grad=True)
    for row in range(len(PROMPTS)):  # one prompt per pass: the same numbers as the teacher's
        with add(lm, {1: vector}):
            loss = student_kl(lm, same, [row]).sum()
        loss.backward()
        assert float(loss) == 0.0
    assert float(vector.grad.abs().max()) < 1e-12
    assert max(evaluate_kl(lm, same, None)) < 1e-12  # padded batches: equal up to rounding


@pytest.mark.parametrize("method", ["vectors", "lowrank"])
def test_gradient_matches_finite_differences(lm, targets, method):
    config = DistillConfig(method, layers=(1, 3), rank=2, seed=3)
    params = distill_module.injection_params(lm, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.3)
    injection = Distilled(method, [1, 3], params, {})
    rows = [0, 2, 3]
    lower = distill_module.block_outputs(lm, targets, 0)  # training starts above block 0, as here

    def kl(*cache):
        return distill_module._injected_kl(lm, targets, rows, injection, *cache)

    loss = kl(lower, 0)
    assert float(loss) == pytest.approx(float(kl()), rel=1e-10)  # the same as a pass through every block
    loss.backward()
    eps = 1e-6
    for name, p in params.items():
        for index in [(0, 0), (1, 1), (-1, -1)]:
            with torch.no_grad():
                p[index] += eps
                up = float(kl())
                p[index] -= 2 * eps
                down = float(kl())
                p[index] += eps
            numeric = (up - down) / (2 * eps)
            assert float(p.grad[index]) == pytest.approx(numeric, rel=1e-5, abs=1e-9), (name, index)


@pytest.mark.parametrize("method", ["vectors", "lowrank", "lora"])
def test_training_lowers_the_kl_and_is_reproducible(lm, targets, method):
    config = DistillConfig(method, layers=(1, 2), rank=2, steps=12, lr=0.002, batch_size=4, seed=1)
    first = distill(lm, targets, config, progress=False)
    second = distill(lm, targets, config, progress=False)
    assert first.losses == second.losses
    assert first.tensors.keys() == second.tensors.keys()
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    before = sum(evaluate_kl(lm, targets, None))
    assert sum(evaluate_kl(lm, targets, first)) < 0.9 * before
    if method != "vectors":  # the seed draws LoRA's A matrices / the basis (and the batches)
        other = distill(lm, targets, DistillConfig(**{**vars(config), "seed": 2}), progress=False)
        assert other.losses != first.losses
    expected = {"vectors": 2 * 32, "lowrank": 2 * 32 + 2 * 2}
    if method in expected:
        assert first.trainable_params == expected[method]
        assert set(first.norms()) == {1, 2}
    else:
        assert first.layers == [1] and first.norms() == {}


def test_interrupted_run_resumes_to_the_same_result(lm, targets, tmp_path, monkeypatch):
    config = DistillConfig("lowrank", layers=(0, 2), rank=2, steps=7, lr=0.05, batch_size=2, seed=4)
    whole = distill(lm, targets, config, progress=False)
    checkpoint = tmp_path / "ckpt"
    real, calls = distill_module._injected_kl, [0]

    def dies_at_step_six(*args):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(distill_module, "_injected_kl", dies_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        distill(lm, targets, config, progress=False, checkpoint=checkpoint, checkpoint_every=2)
    monkeypatch.setattr(distill_module, "_injected_kl", real)
    resumed = distill(lm, targets, config, progress=False, checkpoint=checkpoint, checkpoint_every=2)
    assert resumed.losses == whole.losses
    assert all(torch.equal(resumed.tensors[k], whole.tensors[k]) for k in whole.tensors)
    changed = DistillConfig(**{**vars(config), "lr": 0.01})
    with pytest.raises(UserError, match="another run"):
        distill(lm, targets, changed, progress=False, checkpoint=checkpoint)


def test_actadd_baseline_is_norm_matched_and_results_round_trip(lm, targets, tmp_path):
    trained = distill(lm, targets, DistillConfig("vectors", (1, 2), steps=3, lr=0.05), progress=False)
    baseline = actadd_injection(lm, SYSTEM, PROMPTS, [1, 2], trained.norms(), progress=False)
    for layer, norm in trained.norms().items():
        assert baseline.norms()[layer] == pytest.approx(norm, rel=1e-6)
    raw = actadd_injection(lm, SYSTEM, PROMPTS, [1], progress=False)
    direction = raw.deltas()[1] / raw.deltas()[1].norm()
    assert torch.allclose(baseline.deltas()[1] / baseline.deltas()[1].norm(), direction)
    trained.save(tmp_path / "vec")
    loaded = Distilled.load(tmp_path / "vec")
    assert loaded.losses == trained.losses and loaded.layers == [1, 2]
    assert evaluate_kl(lm, targets, loaded) == evaluate_kl(lm, targets, trained)


def test_bad_inputs_name_the_argument(lm, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="--system-prompt: .*empty"):
        read_system_prompt(str(empty))
    with pytest.raises(UserError, match="--system-prompt: no such file"):
        read_system_prompt(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="--system-prompt: .*distill-prompts"):
        read_system_prompt("builtin:distill-prompts")
    assert "Arr!" in read_system_prompt("builtin:pirate-persona")
    with pytest.raises(UserError, match="--system-prompt: .*context of 256 tokens"):
        check_prompts(lm, "x" * 300, PROMPTS, reply_tokens=5)
    with pytest.raises(UserError, match="--rank must be at least 1"):
        DistillConfig("lowrank", rank=0).check()
    with pytest.raises(UserError, match="--layers: layer 4 is out of range"):
        DistillConfig("vectors", layers=(1, 4)).check(4)
    with pytest.raises(UserError, match="--layers: a layer is named twice"):
        DistillConfig("vectors", layers=(1, 1)).check()


def test_command_writes_every_method_and_the_report(lm, tmp_path):
    system = tmp_path / "system.txt"
    system.write_text(SYSTEM + "\n")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"train": PROMPTS, "test": ["What is red?", "Count to three.", "Hello."]}))
    args = DistillArgs(
        system_prompt=str(system), out=tmp_path / "out", layers="1,2", methods="vectors,actadd,lowrank,lora",
        rank=2, steps=3, lr=0.002, lora_lr=0.002, batch_size=2, reply_tokens=4, prompts=str(prompts),
        generations=2, progress=False,
    )  # fmt: skip
    result = run_distill(args, lm=lm)
    out = tmp_path / "out"
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["unprompted", "vectors L1,2", "actadd L1,2", "lowrank r2 L1,2", "lora r2 L1"]
    assert rows["unprompted"]["removed"] == 0.0 and result["n_test"] == 3
    assert rows["actadd L1,2"]["norm"] == pytest.approx(rows["vectors L1,2"]["norm"], rel=1e-6)
    for row in result["rows"][1:]:
        assert row["kl_low"] <= row["kl"] <= row["kl_high"]
        assert row["removed_low"] <= row["removed"] <= row["removed_high"]
    assert result["tokens_saved_per_call"] == 1 + len("system: " + SYSTEM + "\n")
    for name in ("rows.json", "summary.json", "generations.json", "report.html", "report.md", "kl.png"):
        assert (out / name).is_file(), name
    assert Distilled.load(out / "lowrank-r2-L1_2").method == "lowrank"
    generations = json.loads((out / "generations.json").read_text())
    assert len(generations) == 2 and set(generations[0]) == {
        "prompt",
        "prompted",
        "unprompted",
        *list(rows)[1:],
    }
    assert "lora r2 L1" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rank", "0"], "--rank"),
        (["--methods", "vectors,rlhf"], "--methods"),
        (["--system-prompt", "EMPTY"], "--system-prompt: .* is empty"),
        (["--prompts", "builtin:sentiment-words"], "--prompts: expected a JSON object"),
    ],
)
def test_cli_rejects_bad_input_before_loading(tmp_path, capsys, argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["distill", "--system-prompt", "builtin:pirate-persona", "--out", str(tmp_path / "o")]
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    assert main([*base, *argv, "--model", "no-such-model"]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow
def test_a_vector_absorbs_part_of_the_pirate_persona_on_smollm2(smollm2):
    prompts = ["What is the capital of Australia?", "How do I make a good cup of tea?"]
    targets = teacher_targets(smollm2, read_system_prompt("builtin:pirate-persona"), prompts, 6, False)
    config = DistillConfig("vectors", (15,), steps=6, lr=0.05, batch_size=2)
    before = sum(evaluate_kl(smollm2, targets, None))
    after = sum(evaluate_kl(smollm2, targets, distill(smollm2, targets, config, progress=False)))
    assert before > 0.1 and after < 0.8 * before
