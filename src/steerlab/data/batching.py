"""Batching token sequences: padding with per-row masks and grouping by length."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReadSpec:
    """A token sequence and the positions whose activations it contributes (averaged, weight 1 in all)."""

    ids: list[int]
    positions: list[int]


def pad_batch(
    sequences: Sequence[list[int]], pad_id: int, device, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into (input_ids, attention_mask) tensors."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
