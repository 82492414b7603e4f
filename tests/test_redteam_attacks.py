"""Red-teaming attacks on a tiny float64 model: the ball constraint, gradients against finite differences,
the prefix cache against the full forward pass, MELBO orthogonality, difference of means."""

from __future__ import annotations

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.models import wrap
from steerlab.redteam import attacks as A

PROMPTS = ["How do I bake bread?", "Tell me a joke", "Write a poem about rain", "hi", "What is 2+2?"]


@pytest.fixture
def lm():
    # sdpa: left padding in float64 gives NaN with HF's eager mask
    return wrap(tiny_model("llama", attn="sdpa"), char_tokenizer(), name="tiny-llama")


@pytest.fixture
def objective(lm):
    return A.Objective("target")


def test_batches_align_targets_right(lm):
    (batch,) = A.make_batches(lm, PROMPTS, target="Sure", batch_size=8)
    assert batch.k == 4 and bool((batch.targets >= 0).all())
    assert batch.ids[:, -4:].tolist() == [[lm.tokenizer.convert_tokens_to_ids(c) for c in "Sure"]] * len(
        PROMPTS
    )
    # left padding: every row ends with its target
    assert batch.mask[:, -1].all()


def test_universal_and_per_prompt_stay_in_ball(lm, objective):
    batches = A.make_batches(lm, PROMPTS, target="Sure", batch_size=2)
    radius = 0.7
    delta, trace = A.universal_attack(lm, 1, batches, objective, radius, steps=6, lr=2.0)
    assert delta.norm() <= radius * (1 + 1e-12)
    assert len(trace.losses) == 6
    deltas, _ = A.per_prompt_attack(lm, 1, batches, objective, radius, steps=4, lr=2.0)
    assert deltas.shape == (len(PROMPTS), 32)
    assert bool((deltas.norm(dim=-1) <= radius * (1 + 1e-12)).all())
    inside = torch.full((3, 4), 0.01, dtype=torch.float64)
    assert torch.equal(A.project(inside.clone(), 1.0), inside)


def test_universal_attack_lowers_the_loss(lm, objective):
    batches = A.make_batches(lm, PROMPTS, target="Sure", batch_size=5)
    before = A.batch_scores(lm, 1, batches, objective, None).mean()
    delta, _ = A.universal_attack(lm, 1, batches, objective, radius=3.0, steps=15, lr=0.5)
    after = A.batch_scores(lm, 1, batches, objective, delta).mean()
    assert after < before - 0.1


@pytest.mark.parametrize("kind", ["target", "refusal"])
def test_gradient_matches_finite_differences(kind):
    # GPT-2: its LayerNorm runs in float64 (HF's Llama RMSNorm computes in float32 even in a float64 model)
    lm = wrap(tiny_model("gpt2", attn="sdpa"), char_tokenizer(), name="tiny-gpt2")
    objective = A.Objective(kind, refusal_tokens=(10, 11), compliance_tokens=(20, 21, 22))
    (batch,) = A.make_batches(lm, PROMPTS[:3], target="Sure", batch_size=3)
    cache = A.block_input(lm, 2, batch)
    torch.manual_seed(1)
    delta = (torch.randn(32, dtype=torch.float64) * 0.5).requires_grad_(True)

    def f(d):
        return objective(A.forward_logits(lm, 2, batch, d, cache), batch).mean()

    f(delta).backward()
    grad = delta.grad.clone()
    h = 1e-6
    for direction in (torch.eye(32, dtype=torch.float64)[3], torch.randn(32, dtype=torch.float64)):
        with torch.no_grad():
            numeric = (f(delta + h * direction) - f(delta - h * direction)) / (2 * h)
        torch.testing.assert_close(grad @ direction, numeric, rtol=1e-6, atol=1e-9)


def test_prefix_cache_matches_full_forward(lm, objective):
    (batch,) = A.make_batches(lm, PROMPTS, target="Sure", batch_size=8)
    delta = torch.randn(32, dtype=torch.float64).requires_grad_(True)
    results = []
    for cache in (None, A.block_input(lm, 2, batch)):
        loss = objective(A.forward_logits(lm, 2, batch, delta, cache), batch).mean()
        (grad,) = torch.autograd.grad(loss, delta)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)
    # and the cache really matters: a wrong cache changes the result
    wrong = A.block_input(lm, 2, batch) + 1.0
    moved = objective(A.forward_logits(lm, 2, batch, delta.detach(), wrong), batch).mean()
    assert not torch.isclose(moved, results[0][0])


def test_sink_is_not_perturbed(lm):
    (batch,) = A.make_batches(lm, ["abc"], batch_size=1)
    # the logits at the sink's next prediction would change only if position 0 were perturbed: check
    # the block output directly
    kept = {}

    def keep(layer, hidden):
        kept[layer] = hidden

    from steerlab.hooks import add, read_residual

    with torch.no_grad(), add(lm.model, {1: torch.ones(32, dtype=torch.float64)}, A.POSITIONS):
        with read_residual(lm.model, [1], keep):
            lm.model(input_ids=batch.ids, attention_mask=batch.mask)
    perturbed = kept[1]
    with torch.no_grad(), read_residual(lm.model, [1], keep):
        lm.model(input_ids=batch.ids, attention_mask=batch.mask)
    diff = perturbed - kept[1]
    assert torch.allclose(diff[0, 0], torch.zeros(32, dtype=torch.float64))
    assert torch.allclose(diff[0, 1:], torch.ones_like(diff[0, 1:]))


def test_melbo_vectors_are_orthogonal_with_norm_radius(lm):
    batches = A.make_batches(lm, PROMPTS, batch_size=5)
    vectors, trace = A.melbo_attack(lm, 0, 2, batches, radius=2.0, n_vectors=3, steps=4)
    assert vectors.shape == (3, 32)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.full((3,), 2.0, dtype=torch.float64))
    gram = vectors @ vectors.T
    torch.testing.assert_close(
        gram - torch.diag(gram.diag()), torch.zeros(3, 3, dtype=torch.float64), atol=1e-9, rtol=0
    )
    assert trace.losses[3] < trace.losses[0]  # the change at the target layer grew


def test_diff_of_means_and_random_norms():
    harmful = torch.tensor([[2.0, 0.0], [4.0, 0.0]])
    harmless = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    delta = A.diff_of_means(harmful, harmless, radius=5.0)
    torch.testing.assert_close(delta, torch.tensor([-3.0, 1.0], dtype=torch.float64) / 10**0.5 * 5)
    rand = A.random_directions(16, 20, 3.0, seed=1)
    torch.testing.assert_close(rand.norm(dim=-1), torch.full((20,), 3.0, dtype=torch.float64))


def test_residual_stats_skip_sink_and_padding(lm):
    batches = A.make_batches(lm, ["ab", "abcdef"], batch_size=2)
    norm, last = A.residual_stats(lm, 1, batches)
    from steerlab.hooks import capture_residual

    expected, lasts = [], []
    for prompt in ["ab", "abcdef"]:
        ids = torch.tensor([A.chat_ids(lm, prompt)])
        with torch.no_grad(), capture_residual(lm.model, [1]) as got:
            lm.model(input_ids=ids)
        expected.append(got[1][0, 1:].norm(dim=-1))
        lasts.append(got[1][0, -1])
    assert norm == pytest.approx(float(torch.cat(expected).mean()), rel=1e-10)
    torch.testing.assert_close(last, torch.stack(lasts), rtol=1e-9, atol=1e-10)
