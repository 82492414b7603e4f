"""Which token positions receive an intervention, counted per row over real tokens (padding excluded).

Positions count the real tokens of each row, starting at 0, so left and right padding behave alike. The
first forward call inside an intervention context is the prompt; cached calls after it, and uncached calls
that extend the previous call's input, are decode steps. Position 0 (BOS / the attention sink) is left
alone unless `include_sink=True`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steerlab.errors import UserError


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
        if not indices or min(indices) < 0:
            raise UserError(f"positions 'at' needs real-token indices >= 0, got {list(indices)}")
        return cls(
            start=None, indices=tuple(int(i) for i in indices), decode=False, include_sink=include_sink
        )

    @classmethod
    def decode_only(cls) -> Positions:
        return cls(start=None, decode=True)

    @classmethod
    def parse(cls, text: str) -> Positions:
        """CLI form: 'all', 'decode', 'from:K' (K may be negative) or 'at:I,J,...'."""
        spec = text.strip().lower()
        try:
            if spec == "all":
                return cls.all()
            if spec == "decode":
                return cls.decode_only()
            if spec.startswith("from:"):
                return cls.from_position(int(spec[5:]))
            if spec.startswith("at:"):
                return cls.at(*(int(i) for i in spec[3:].split(",")))
        except ValueError as error:
            raise UserError(f"--positions {text!r}: {_reason(error)}") from None
        raise UserError(f"--positions {text!r}: use 'all', 'decode', 'from:K' or 'at:I,J'")

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


def _reason(error: ValueError) -> str:
    return str(error) if isinstance(error, UserError) else "K, I and J must be integers"


class _StepState:
    """Per-forward-call facts shared by the top-level pre-hook and the block hooks."""

    def __init__(self, positions: Positions):
        self.positions = positions
        self.prompt_len: torch.Tensor | None = None  # (B,) real prompt length per row
        self.prev_ids: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # (B, T) real-token positions of the last uncached call
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
        self.pos = pos
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
