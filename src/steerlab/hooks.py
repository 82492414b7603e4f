"""The one place that registers hooks on a model's blocks and head: reading and adding at the residual
stream, recording a block's input or the head's input, and starting a forward pass at a later block.
(The only other hooks are `steerlab.influence.capture`'s, on the tracked Linear modules themselves.)

The residual stream "at layer L" is the output of decoder block L (what `output_hidden_states[L + 1]`
returns for every layer but the last, where Hugging Face applies the final norm first).

A `Positions` spec says which tokens receive a steering vector. Positions count the real tokens of each
row (padding excluded, so left and right padding behave alike), starting at 0. The first forward call
inside a steering context is the prompt; cached calls after it, and uncached calls that extend the
previous call's input, are decode steps. Position 0 (BOS / the attention sink) is left alone unless
`include_sink=True`. Every hook is removed when its context exits, also on exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from steerlab.models.architectures import block, decoder_layers, resolve_layer

__all__ = [
    "Positions",
    "StopForward",
    "as_module",
    "capture_residual",
    "read_residual",
    "record_block_input",
    "record_head_input",
    "run_to_layers",
    "start_at_block",
    "steer",
]


def as_module(model) -> nn.Module:
    """Accept a `LoadedModel` or a bare `nn.Module`."""
    return model.model if hasattr(model, "tokenizer") and hasattr(model, "model") else model


@dataclass(frozen=True)
class Positions:
    """Which token positions receive a vector.

    start: prompt positions >= start receive it; a negative start counts back from the end of each row's
        prompt (-1: the last prompt token); a sequence gives one start per row; None: no prompt position.
    indices: explicit real-token indices instead of `start` (may reach into the decode steps).
    decode: decode steps receive it (ignored when `indices` is given).
    include_sink: position 0 may receive it.
    """

    start: int | tuple[int, ...] | None = 0
    indices: tuple[int, ...] | None = None
    decode: bool = True
    include_sink: bool = False

    @classmethod
    def all(cls, include_sink: bool = False) -> Positions:
        return cls(start=0, include_sink=include_sink)

    @classmethod
    def from_position(cls, start: int | Sequence[int], decode: bool = True) -> Positions:
        return cls(start=start if isinstance(start, int) else tuple(int(s) for s in start), decode=decode)

    @classmethod
    def at(cls, *indices: int, include_sink: bool = False) -> Positions:
        return cls(
            start=None, indices=tuple(int(i) for i in indices), decode=False, include_sink=include_sink
        )

    @classmethod
    def decode_only(cls) -> Positions:
        return cls(start=None, decode=True)

    @classmethod
    def parse(cls, text: str) -> Positions:
        """CLI form: 'all', 'decode', 'from:K' (K may be negative) or 'at:I,J,...'."""
        text = text.strip().lower()
        if text == "all":
            return cls.all()
        if text == "decode":
            return cls.decode_only()
        if text.startswith("from:"):
            return cls.from_position(int(text[5:]))
        if text.startswith("at:"):
            return cls.at(*(int(i) for i in text[3:].split(",") if i))
        raise ValueError(f"unknown positions spec {text!r}: use 'all', 'decode', 'from:K' or 'at:I,J'")

    def select(self, pos: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
        """Boolean (B, T) selection for real-token positions `pos` given each row's prompt length (B,)."""
        plen = prompt_len[:, None]
        if self.indices is not None:
            chosen = torch.zeros_like(pos, dtype=torch.bool)
            for index in self.indices:
                chosen |= pos == index
        else:
            is_decode = pos >= plen
            chosen = is_decode if self.decode else torch.zeros_like(pos, dtype=torch.bool)
            if self.start is not None:
                start = self.start
                if isinstance(start, tuple):
                    if len(start) != pos.shape[0]:
                        raise ValueError(
                            f"Positions has {len(start)} per-row starts for a batch of {pos.shape[0]}"
                        )
                    start = torch.tensor(start, device=pos.device)[:, None]
                    start = torch.where(start < 0, plen + start, start)
                elif start < 0:
                    start = plen + start
                chosen = chosen | ((pos >= start) & ~is_decode)
        if not self.include_sink:
            chosen = chosen & (pos != 0)
        return chosen

    @property
    def steers_every_decode_step(self) -> bool:
        """Whether every decode token of every row is selected (the no-mask fast path)."""
        return self.indices is None and self.decode


class _StepState:
    """Per-forward-call facts shared by the top-level pre-hook and the block hooks."""

    def __init__(self, positions: Positions):
        self.positions = positions
        self.prompt_len: torch.Tensor | None = None  # (B,) real prompt length per row
        self.prev_ids: torch.Tensor | None = None
        self.selection: torch.Tensor | None | str = None  # None: nothing; "all": every token; else (B,T,1)

    def before_forward(
        self, input_ids, attention_mask, past_len: int, seq_len: int, batch: int, device
    ) -> None:
        if past_len > 0 and self.prompt_len is not None:
            self._cached_step(attention_mask, past_len, seq_len, device)
            return
        continuing = (
            input_ids is not None
            and self.prev_ids is not None
            and self.prev_ids.shape[0] == batch
            and seq_len > self.prev_ids.shape[1]
            and torch.equal(input_ids[:, : self.prev_ids.shape[1]], self.prev_ids)
        )
        mask = attention_mask if attention_mask is not None else torch.ones(batch, seq_len, device=device)
        mask = mask[:, -seq_len:]
        pos = mask.long().cumsum(-1) - 1
        if not continuing:
            self.prompt_len = mask.long().sum(-1)
        self.prev_ids = input_ids
        chosen = self.positions.select(pos, self.prompt_len) & mask.bool()
        self.selection = chosen[..., None]

    def _cached_step(self, attention_mask, past_len: int, seq_len: int, device) -> None:
        if self.positions.steers_every_decode_step:
            self.selection = "all"
            return
        if not self.positions.decode and self.positions.indices is None:
            self.selection = None
            return
        # Rare path (explicit indices, or a start beyond some prompt): build the selection for this step.
        mask = (
            attention_mask
            if attention_mask is not None
            else torch.ones(self.prompt_len.shape[0], past_len + seq_len, device=device)
        )
        pos = (mask.long().cumsum(-1) - 1)[:, -seq_len:]
        self.selection = self.positions.select(pos, self.prompt_len)[..., None]


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
