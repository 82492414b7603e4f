"""Loss tasks: how a batch becomes model outputs and a (mean) loss, and how much the batch weighs.

The dataset loss is the weighted mean  L = sum_b w_b L_b / sum_b w_b,  so the curvature of a dataset is
the same whichever way it is cut into batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossTask:
    """`forward(model, batch) -> outputs`, `loss(outputs, batch) -> mean loss`, `weight(batch) -> float`.

    Splitting outputs from the loss is what makes Gauss-Newton products possible: the GGN is
    J^T (d^2 loss / d outputs^2) J with J the Jacobian of the outputs.
    """

    forward: Callable[[nn.Module, Any], torch.Tensor]
    loss: Callable[[torch.Tensor, Any], torch.Tensor]
    weight: Callable[[Any], float]
    name: str = "custom"

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss(self.forward(model, batch), batch)


def classification_task() -> LossTask:
    """Batches are `(inputs, labels)`; mean cross-entropy of `model(inputs)`."""
    return LossTask(
        forward=lambda model, batch: model(batch[0]),
        loss=lambda out, batch: F.cross_entropy(out, batch[1]),
        weight=lambda batch: float(len(batch[1])),
        name="classification-ce",
    )


def _lm_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return ids[:, 1:], mask[:, 1:] & mask[:, :-1]


def _lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    targets, keep = _lm_targets(batch)
    logits = logits[:, :-1]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    keep = keep.reshape(-1).to(losses.dtype)
    return (losses * keep).sum() / keep.sum().clamp_min(1)


def lm_task() -> LossTask:
    """Batches are dicts with `input_ids` (and `attention_mask`); mean next-token CE over kept tokens."""
    return LossTask(
        forward=lambda model, batch: (
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        ),
        loss=_lm_loss,
        weight=lambda batch: float(_lm_targets(batch)[1].sum()),
        name="lm-next-token-ce",
    )


def lm_batches(tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 64) -> list[dict]:
    """Tokenise `texts` into padded batches for `lm_task`."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def train_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, weight_decay: float
) -> list[float]:
    """Full-batch Adam on (x, y); returns the loss curve and leaves the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())
