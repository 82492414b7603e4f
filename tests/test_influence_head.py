"""The chunked head cross-entropy equals autograd through the model's own head, for every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, tiny_model
from steerlab.influence import LanguageModelTask
from steerlab.influence.head import head_cross_entropy
from steerlab.models.architectures import plain_head


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt without loss
    labels[2, 8:] = -100  # padding
    mask = (labels != -100).long()
    mask[0] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _autograd(model, batch, labels):
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = hidden.last_hidden_state.detach().requires_grad_(True)
    logits = model.get_output_embeddings()(hidden)
    if getattr(model.config, "final_logit_softcapping", None):
        cap = model.config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return loss, torch.autograd.grad(loss, hidden)[0], hidden.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_head_loss_and_gradient_equal_autograd(family):
    model = tiny_model(family)
    batch = _batch(model.config.vocab_size)
    shifted = LanguageModelTask._shifted_labels(batch)
    head = plain_head(model)
    if family == "gemma2":  # soft-capped logits: the model's own head is used
        assert head is None
        return
    assert head is not None
    loss, grad, hidden = _autograd(model, batch, shifted)
    out = head_cross_entropy(hidden, head, shifted, chunk_tokens=7)  # chunks split rows unevenly
    assert torch.allclose(out.loss, loss, rtol=1e-12)
    assert torch.allclose(out.grad, grad, rtol=1e-10, atol=1e-14)
    assert torch.equal(out.grad, out.data_grad)
    # sampled labels: loss and gradient of the labels drawn, data-label gradient unchanged
    sampled = head_cross_entropy(hidden, head, shifted, torch.Generator().manual_seed(1), chunk_tokens=7)
    assert torch.equal(sampled.labels == -100, shifted == -100)
    assert not torch.equal(sampled.labels, shifted)
    loss_s, grad_s, _ = _autograd(model, batch, sampled.labels)
    assert torch.allclose(sampled.loss, loss_s, rtol=1e-12)
    assert torch.allclose(sampled.grad, grad_s, rtol=1e-10, atol=1e-14)
    assert torch.allclose(sampled.data_grad, grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_task_loss_gradient_below_the_head_equals_plain_cross_entropy(family):
    """The task's loss (chunked head, or the model's own for gemma2) backpropagates like F.cross_entropy."""
    model = tiny_model(family)
    batch = _batch(model.config.vocab_size, seed=3)
    task = LanguageModelTask(layers=[0])
    weight = task.modules(model)[next(iter(task.modules(model)))].weight
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = LanguageModelTask._shifted_labels(batch)
    want = torch.autograd.grad(
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="sum"), weight
    )[0]
    loss = task.train_loss(model, batch)
    got = torch.autograd.grad(loss, weight)[0]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


def test_sample_categorical_draws_from_the_distribution():
    from steerlab.influence.head import sample_categorical

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float32)
    draws = sample_categorical(probs.repeat(20000, 1), torch.Generator().manual_seed(0)).reshape(20000, 2)
    freq = torch.stack([torch.bincount(draws[:, r], minlength=4).float() / 20000 for r in range(2)])
    assert torch.allclose(freq, probs, atol=0.012)  # ~3.5 standard errors
    assert freq[0, 1] == 0 and torch.equal(draws[:, 1], torch.full((20000,), 3))  # never a zero entry
    unnormalised = sample_categorical(probs * 7.0, torch.Generator().manual_seed(0))
    assert torch.equal(unnormalised, sample_categorical(probs, torch.Generator().manual_seed(0)))
