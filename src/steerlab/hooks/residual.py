"""Reading and adding at the residual stream.

The residual stream "at layer L" is the output of decoder block L (what `output_hidden_states[L + 1]`
returns for every layer but the last, where Hugging Face applies the final norm first). Every hook is
removed when its context exits, also on exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from steerlab.hooks.positions import Positions, _StepState
from steerlab.models.architectures import block, resolve_layer


def as_module(model) -> nn.Module:
    """Accept a `LoadedModel` or a bare `nn.Module`."""
    return model.model if hasattr(model, "tokenizer") and hasattr(model, "model") else model


def _forward_inputs(args, kwargs):
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    reference = input_ids if input_ids is not None else embeds
    cache = kwargs.get("past_key_values")
    past_len = 0
    if cache is not None and hasattr(cache, "get_seq_length"):
        past_len = int(cache.get_seq_length())
    elif isinstance(cache, tuple | list) and cache and cache[0] is not None:
        past_len = int(cache[0][0].shape[-2])
    return input_ids, kwargs.get("attention_mask"), past_len, reference


def _replace_hidden(output, hidden: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def _hidden_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def steer(
    model,
    vectors: Mapping[int, torch.Tensor],
    multiplier: float = 1.0,
    positions: Positions | None = None,
) -> Iterator[None]:
    """Add `multiplier * vectors[L]` to the residual stream after each block L at the chosen positions."""
    module = as_module(model)
    positions = positions or Positions.all()
    state = _StepState(positions)

    def pre_hook(_module, args, kwargs):
        input_ids, attention_mask, past_len, reference = _forward_inputs(args, kwargs)
        batch, seq_len = reference.shape[0], reference.shape[1]
        state.before_forward(input_ids, attention_mask, past_len, seq_len, batch, reference.device)

    def make_block_hook(delta: torch.Tensor) -> Callable:
        def hook(_module, _args, output):
            selection = state.selection
            if selection is None:
                return None
            hidden = _hidden_of(output)
            if isinstance(selection, str):
                return _replace_hidden(output, hidden + delta)
            return _replace_hidden(
                output, hidden + selection.to(device=hidden.device, dtype=hidden.dtype) * delta
            )

        return hook

    with ExitStack() as stack:
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        stack.callback(handle.remove)
        for layer, vector in vectors.items():
            target = block(module, layer)
            param = next(target.parameters())
            delta = (vector.detach().to(device=param.device, dtype=param.dtype) * multiplier).reshape(-1)
            handle = target.register_forward_hook(make_block_hook(delta))
            stack.callback(handle.remove)
        yield


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the last needed layer has run."""


@contextmanager
def read_residual(
    model,
    layers: Sequence[int],
    callback: Callable[[int, torch.Tensor], None],
    stop_after_last: bool = False,
) -> Iterator[None]:
    """Call `callback(layer, hidden)` with each block's output; optionally stop after the last layer."""
    module = as_module(model)
    resolved = sorted({resolve_layer(module, layer) for layer in layers})
    last = resolved[-1] if resolved else None

    def make_hook(layer: int) -> Callable:
        def hook(_module, _args, output):
            callback(layer, _hidden_of(output))
            if stop_after_last and layer == last:
                raise StopForward

        return hook

    with ExitStack() as stack:
        for layer in resolved:
            handle = block(module, layer).register_forward_hook(make_hook(layer))
            stack.callback(handle.remove)
        yield


def run_to_layers(
    model, layers: Sequence[int], callback: Callable[[int, torch.Tensor], None], **inputs
) -> None:
    """Run a forward pass that calls `callback` at `layers` and stops after the last of them."""
    module = as_module(model)
    with read_residual(module, layers, callback, stop_after_last=True):
        try:
            module(**inputs, use_cache=False)
        except StopForward:
            pass


@contextmanager
def capture_residual(model, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Keep the residual stream (B, T, D) of the last forward call at each layer, keyed by resolved index."""
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        captured[layer] = hidden.detach()

    with read_residual(model, layers, keep):
        yield captured
