"""The pass cache: start the forward pass at the first tracked layer, and skip the output head.

Influence passes (covariance, eigenvalue correction, scoring) differ only above the first tracked layer:
with MLPs of layers 24-29 of a 30-layer model tracked, 80% of each forward pass recomputes the same hidden
states. The covariance pass records the input of block L (the first tracked layer); later passes replace
blocks 0..L-1 by a pass-through and feed the recorded states to block L, so only blocks L.. run. The
model is restored on exit, also on exceptions. Supported where decoder blocks return a tensor
(Llama-like families in transformers >= 5); the equality of logits is tested.

The covariance pass also records g_h, the gradient of the data-label training loss with respect to the
output head's input h. Every later pass that uses data labels (scoring; the eigenvalue correction of the
empirical Fisher) backpropagates the surrogate <h, g_h> instead of the loss: its gradient is the same
everywhere below the head, and the head (vocabulary x hidden, the largest matrix of a small LM) is
neither run forward nor backward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from steerlab.influence.scores import layer_of

__all__ = ["first_tracked_layer", "record_head_input", "record_layer_input", "start_at_layer"]


def first_tracked_layer(modules: Mapping[str, nn.Module]) -> int | None:
    """The lowest decoder-layer index among tracked module names (None if any is outside the layers)."""
    layers = [layer_of(n) for n in modules]
    return None if not layers or any(x is None for x in layers) else min(layers)


def _hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def record_layer_input(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden states entering decoder block `layer` (one tensor per forward call)."""
    from steerlab.models import block

    seen: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        seen.append(_hidden_arg(args, kwargs).detach().clone())

    handle = block(model, layer).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def record_head_input(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the tensor entering the output head (`get_output_embeddings()`), graph attached."""
    seen: list[torch.Tensor] = []

    def pre_hook(_module, args):
        seen.append(args[0])

    handle = model.get_output_embeddings().register_forward_pre_hook(pre_hook)
    try:
        yield seen
    finally:
        handle.remove()


class _PassThrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def start_at_layer(model: nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block, a forward call skips blocks 0..layer-1 and feeds `hidden` to block `layer`."""
    from steerlab.models import decoder_layers

    layers = decoder_layers(model)
    saved = [layers[i] for i in range(layer)]

    def pre_hook(_module, args, kwargs):
        if _hidden_arg(args, kwargs).shape != hidden.shape:
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
