"""Hooks on a model's blocks and head: recording a block's or the head's input, and starting a forward
pass at a later block (used by influence's pass cache)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from steerlab.hooks.residual import as_module
from steerlab.models.architectures import block, decoder_layers


def _block_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def record_block_input(model, layer: int) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden states entering decoder block `layer` (a detached copy per forward call)."""
    seen: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        seen.append(_block_input(args, kwargs).detach().clone())

    handle = block(as_module(model), layer).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def record_head_input(model) -> Iterator[list[torch.Tensor]]:
    """Collect the tensor entering the output head (`get_output_embeddings()`), graph attached."""
    seen: list[torch.Tensor] = []

    def pre_hook(_module, args):
        seen.append(args[0])

    handle = as_module(model).get_output_embeddings().register_forward_pre_hook(pre_hook)
    try:
        yield seen
    finally:
        handle.remove()


class _PassThrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def start_at_block(model, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the context, a forward call skips blocks 0..layer-1 (replaced by a pass-through) and feeds
    `hidden` to block `layer`; the blocks are restored on exit, also on exceptions."""
    layers = decoder_layers(as_module(model))
    saved = [layers[i] for i in range(layer)]

    def pre_hook(_module, args, kwargs):
        if _block_input(args, kwargs).shape != hidden.shape:
            raise ValueError(f"cached hidden states {tuple(hidden.shape)} do not fit this batch")
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(layer):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, module in enumerate(saved):
            layers[i] = module
        handle.remove()
