"""Temporary model modes: no parameter gradients, and eval mode with eager attention for curvature."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def no_param_grads(model: nn.Module) -> Iterator[None]:
    """Switch off `requires_grad` for every parameter of `model` (restored on exit)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextmanager
def curvature_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and eager attention for the duration (fused attention kernels have no double backward)."""
    was_training = model.training
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None) if config is not None else None
    switched = False
    if previous is not None and previous != "eager":
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"
        switched = True
    model.eval()
    try:
        yield model
    finally:
        if switched:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(previous)
            else:
                config._attn_implementation = previous
        model.train(was_training)
