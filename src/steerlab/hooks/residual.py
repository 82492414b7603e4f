"""Reading and editing the residual stream: `add` (gradient-carrying deltas), `add_block` (one delta per
prompt position, as in ActAdd), `steer` (a fixed vector times a multiplier, built on `add`), `ablate`
(project out a direction) and readers.

The residual stream "at layer L" is the output of decoder block L (what `output_hidden_states[L + 1]`
returns for every layer but the last, where Hugging Face applies the final norm first). Every hook is
removed when its context exits, also on exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
from torch import nn

from steerlab.errors import UserError
from steerlab.hooks.positions import Positions, _StepState
from steerlab.models.architectures import block, hidden_size, num_layers, resolve_layer

Edit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def _by_layer(module: nn.Module, tensors: Mapping[int, torch.Tensor], what: str) -> dict[int, torch.Tensor]:
    """Key `tensors` by resolved layer, checking each is (D,) or (B, D) and no layer is named twice."""
    width = hidden_size(module)
    chosen: dict[int, torch.Tensor] = {}
    named: dict[int, int] = {}
    for layer, tensor in tensors.items():
        index = resolve_layer(module, layer)
        if index in chosen:
            raise UserError(f"layers {named[index]} and {layer} are the same layer {index}: give one {what}")
        if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2) or tensor.shape[-1] != width:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(
                f"the {what} for layer {layer} has shape {shape}; expected ({width},) or (batch, {width})"
            )
        chosen[index], named[index] = tensor, layer
    return chosen


@contextmanager
def _edit_residual(
    module: nn.Module,
    tensors: dict[int, torch.Tensor],
    positions: Positions | None,
    edit: Edit,
    what: str,
) -> Iterator[None]:
    """Replace the output h of each block L by `edit(h, tensors[L])` at the selected positions."""
    state = _StepState(positions or Positions.all())
    rows = {layer: t.shape[0] for layer, t in tensors.items() if t.dim() == 2}

    def pre_hook(_module, args, kwargs):
        input_ids, attention_mask, past_len, reference = _forward_inputs(args, kwargs)
        batch, seq_len = reference.shape[0], reference.shape[1]
        for layer, count in rows.items():
            if count != batch:
                raise UserError(f"the {what} for layer {layer} has {count} rows for a batch of {batch}")
        state.before_forward(input_ids, attention_mask, past_len, seq_len, batch, reference.device)

    def make_block_hook(tensor: torch.Tensor) -> Callable:
        def hook(_module, _args, output):
            selection = state.selection
            if selection is None:
                return None
            hidden = _hidden_of(output)
            value = _like_hidden(tensor, hidden)
            if value.dim() == 2:
                value = value[:, None]  # one per row: (B, 1, D)
            edited = edit(hidden, value)
            if isinstance(selection, str):
                return _replace_hidden(output, edited)
            if selection.device != hidden.device:
                selection = selection.to(hidden.device)
            return _replace_hidden(output, torch.where(selection, edited, hidden))

        return hook

    with ExitStack() as stack:
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        stack.callback(handle.remove)
        for layer, tensor in tensors.items():
            handle = block(module, layer).register_forward_hook(make_block_hook(tensor))
            stack.callback(handle.remove)
        yield


def _like_hidden(tensor: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`tensor` in `hidden`'s dtype and on its device; `.to` keeps the gradient path."""
    if tensor.dtype != hidden.dtype or tensor.device != hidden.device:
        return tensor.to(device=hidden.device, dtype=hidden.dtype)
    return tensor


def _plus(hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return hidden + delta


def add(
    model, deltas: Mapping[int, torch.Tensor], positions: Positions | None = None
) -> AbstractContextManager[None]:
    """Add `deltas[L]` to the residual stream after each block L at the chosen positions (default: all but
    the sink).

    A delta is (D,) (the same for every row) or (B, D) (one per row of a batch of B); layers may be
    negative. Nothing is detached: a delta with `requires_grad=True` receives gradients through the
    forward pass, and it is cast to the residual's dtype and device at each call (so an optimiser's
    in-place updates are seen). A delta that reaches no position in a pass gets no gradient from it.
    """
    module = as_module(model)
    return _edit_residual(module, _by_layer(module, deltas, "delta"), positions, _plus, "delta")


def _blocks_by_layer(module: nn.Module, blocks: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Key per-position blocks by resolved layer, checking each is (n, D) or (B, n, D) with n >= 1."""
    width = hidden_size(module)
    n = num_layers(module)
    chosen: dict[int, torch.Tensor] = {}
    for layer, tensor in blocks.items():
        if not -n <= layer < n:
            raise UserError(f"layer {layer} is out of range for a model with {n} layers (0..{n - 1})")
        index = layer % n
        if index in chosen:
            raise UserError(f"layer {layer} is named twice (as layer {index}): give one block per layer")
        if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (2, 3) or tensor.shape[-1] != width:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(
                f"the block for layer {layer} has shape {shape}; expected (positions, {width}) or "
                f"(batch, positions, {width})"
            )
        if tensor.shape[-2] == 0:
            raise UserError(f"the block for layer {layer} has no position")
        chosen[index] = tensor
    return chosen


@contextmanager
def add_block(
    model, blocks: Mapping[int, torch.Tensor], start: int = 1, truncate: bool = False
) -> Iterator[None]:
    """Add a per-position block: row i of `blocks[L]` (n, D) is added after block L at prompt position
    `start + i` of every row (real tokens counted, so left and right padding behave alike); a (B, n, D)
    block gives each row of a batch of B its own (n, D) block.

    Decode steps never receive it, cached or not, so cached and uncached generation agree. A prompt
    shorter than `start + n` tokens raises a `UserError` unless `truncate=True`, which adds only the rows
    that fit. As with `add`, nothing is detached: gradients reach the blocks.
    """
    if start < 0:
        raise UserError(f"add_block: start must be >= 0, got {start}")
    module = as_module(model)
    chosen = _blocks_by_layer(module, blocks)
    longest = max(tensor.shape[-2] for tensor in chosen.values())
    rows = {layer: t.shape[0] for layer, t in chosen.items() if t.dim() == 3}
    state = _StepState(Positions(start=start, decode=False, include_sink=start == 0))

    def pre_hook(_module, args, kwargs):
        input_ids, attention_mask, past_len, reference = _forward_inputs(args, kwargs)
        batch, seq_len = reference.shape[0], reference.shape[1]
        for layer, count in rows.items():
            if count != batch:
                raise UserError(f"the block for layer {layer} has {count} rows for a batch of {batch}")
        state.before_forward(input_ids, attention_mask, past_len, seq_len, batch, reference.device)
        if state.selection is None or truncate:
            return
        shortest = int(state.prompt_len.min())
        if shortest < start + longest:
            raise UserError(
                f"a prompt of {shortest} tokens is shorter than the {longest} positions added from "
                f"position {start}: give a longer prompt or truncate the block"
            )

    def make_block_hook(tensor: torch.Tensor) -> Callable:
        count = tensor.shape[-2]

        def hook(_module, _args, output):
            selection = state.selection
            if selection is None:  # a cached decode step: nothing to add
                return None
            hidden = _hidden_of(output)
            value = _like_hidden(tensor, hidden)
            pos = state.pos.to(hidden.device)
            offset = pos - start
            inside = selection[..., 0].to(hidden.device) & (offset < count)
            index = offset.clamp(0, count - 1)
            if value.dim() == 3:  # one block per row: (B, n, D) -> (B, T, D)
                gathered = value[torch.arange(value.shape[0], device=hidden.device)[:, None], index]
            else:
                gathered = value[index]
            delta = gathered * inside[..., None]
            return _replace_hidden(output, hidden + delta)

        return hook

    with ExitStack() as stack:
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        stack.callback(handle.remove)
        for layer, tensor in chosen.items():
            handle = block(module, layer).register_forward_hook(make_block_hook(tensor))
            stack.callback(handle.remove)
        yield


def _like_block(module: nn.Module, layer: int, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in the dtype and on the device of the first floating-point parameter of block `layer`."""
    for param in block(module, layer).parameters():
        if param.is_floating_point():
            return tensor.to(device=param.device, dtype=param.dtype)
    return tensor


def steer(
    model,
    vectors: Mapping[int, torch.Tensor],
    multiplier: float = 1.0,
    positions: Positions | None = None,
) -> AbstractContextManager[None]:
    """Add `multiplier * vectors[L]` (detached) to the residual stream after each block L at the chosen
    positions."""
    module = as_module(model)
    deltas = {
        layer: (_like_block(module, layer, vector.detach()) * multiplier).reshape(-1)
        for layer, vector in vectors.items()
    }
    return add(module, deltas, positions)


def _project_out(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    unit = direction / direction.norm(dim=-1, keepdim=True)
    return hidden - (hidden * unit).sum(-1, keepdim=True) * unit


def ablate(
    model,
    directions: torch.Tensor | Mapping[int, torch.Tensor],
    layers: Sequence[int] | None = None,
    positions: Positions | None = None,
) -> AbstractContextManager[None]:
    """Remove the component along a direction from the residual stream: h - (h.u)u with u = d / |d|.

    `directions` is one tensor used at `layers` (default: every layer) or a mapping layer -> tensor; each
    is (D,) or (B, D) (one per row). Like `add`, nothing is detached: gradients reach the directions.
    """
    module = as_module(model)
    if isinstance(directions, torch.Tensor):
        chosen = range(num_layers(module)) if layers is None else layers
        directions = dict.fromkeys(chosen, directions)
    elif layers is not None:
        raise UserError("ablate: pass `layers` only with a single direction; a mapping names its layers")
    units = _by_layer(module, directions, "direction")
    for layer, direction in units.items():
        if not bool((direction.detach().norm(dim=-1) > 0).all()):
            raise UserError(f"the direction for layer {layer} is zero; ablation needs a non-zero direction")
    return _edit_residual(module, units, positions, _project_out, "direction")


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
