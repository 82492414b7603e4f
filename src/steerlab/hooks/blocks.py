"""Hooks on a model's blocks and head: recording a block's or the head's input, and starting a forward
pass at a later block (used by influence's pass cache) or after a block whose outputs were recorded
(used by the steering sweep)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


def _feed(next_hidden: Callable[[tuple], torch.Tensor]) -> Callable:
    """A forward pre-hook that replaces a block's input hidden states with `next_hidden(input shape)`."""

    def pre_hook(_module, args, kwargs):
        hidden = next_hidden(tuple(_block_input(args, kwargs).shape))
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return pre_hook


@contextmanager
def _bypass(model, stand_ins: dict[int, nn.Module], fed: nn.Module, pre_hook: Callable) -> Iterator[None]:
    """Swap the given decoder blocks for stand-ins and feed `fed` through `pre_hook`; restore on exit."""
    layers = decoder_layers(as_module(model))
    saved = {i: layers[i] for i in stand_ins}
    handle = fed.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i, module in stand_ins.items():
            layers[i] = module
        yield
    finally:
        for i, module in saved.items():
            layers[i] = module
        handle.remove()


def start_at_block(model, layer: int, hidden: torch.Tensor):
    """Inside the context, a forward call skips blocks 0..layer-1 (replaced by a pass-through) and feeds
    `hidden` to block `layer`; the blocks are restored on exit, also on exceptions."""

    def next_hidden(shape: tuple) -> torch.Tensor:
        if shape != tuple(hidden.shape):
            raise ValueError(f"cached hidden states {tuple(hidden.shape)} do not fit this batch")
        return hidden

    block = decoder_layers(as_module(model))[layer]
    return _bypass(model, {i: _PassThrough() for i in range(layer)}, block, _feed(next_hidden))


class _Resume(_PassThrough):
    """Stands in for a skipped block whose output is given. A zero-size parameter carries the block's
    dtype and device, which `steer` casts its vectors to."""

    def __init__(self, like: nn.Module):
        super().__init__()
        reference = next((p for p in like.parameters() if p.is_floating_point()), None)
        if reference is not None:
            empty = torch.empty(0, dtype=reference.dtype, device=reference.device)
            self.like = nn.Parameter(empty, requires_grad=False)


def resume_after_block(model, layer: int, outputs: Sequence[torch.Tensor]):
    """Inside the context, the k-th forward call skips blocks 0..`layer` and takes `outputs[k]` as the
    output of block `layer` (e.g. recorded with `read_residual` in an earlier pass over the same inputs).

    Hooks registered on block `layer` *inside* the context (`steer`, `add`, `ablate`, `read_residual`) act
    on that output as they would on the block's own. The blocks are restored on exit, also on exceptions;
    a call beyond `len(outputs)`, or one whose shape differs, raises ValueError.
    """
    resume = _Resume(decoder_layers(as_module(model))[layer])
    calls = [0]

    def next_hidden(shape: tuple) -> torch.Tensor:
        index = calls[0]
        calls[0] += 1
        if index >= len(outputs):
            raise ValueError(
                f"forward call {index + 1} after block {layer}, but {len(outputs)} outputs were given"
            )
        hidden = outputs[index]
        if shape != tuple(hidden.shape):
            raise ValueError(
                f"given output {tuple(hidden.shape)} of block {layer} does not fit forward call {index + 1}"
            )
        return hidden

    stand_ins: dict[int, nn.Module] = {i: _PassThrough() for i in range(layer)}
    stand_ins[layer] = resume
    return _bypass(model, stand_ins, resume, _feed(next_hidden))
