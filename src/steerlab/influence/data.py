"""Token batches for the language-model task: training blocks and prompt/completion queries."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["batches", "lm_batch", "query_batch", "text_blocks"]


def lm_batch(
    sequences: Sequence[Sequence[int]], loss_from: Sequence[int] | None = None, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on padding and before `loss_from[i]`:
    the first token whose prediction carries loss; default 1, i.e. every next-token prediction)."""
    if not sequences:
        raise ValueError("empty batch")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq)
        ids[i, :n] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, :n] = 1
        start = 1 if loss_from is None else max(1, int(loss_from[i]))
        labels[i, start:n] = ids[i, start:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def query_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int = 0
) -> dict:
    """Prompt + completion sequences with loss on the completion tokens only."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    return lm_batch(seqs, [len(p) for p in prompts], pad_id)


def text_blocks(token_ids: Sequence[int], block_size: int, n_blocks: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping blocks of `block_size` tokens (the last partial block dropped)."""
    blocks = [
        list(token_ids[i : i + block_size]) for i in range(0, len(token_ids) - block_size + 1, block_size)
    ]
    return blocks if n_blocks is None else blocks[:n_blocks]


def batches(items: Sequence, batch_size: int) -> list[Sequence]:
    """Split a list into consecutive chunks of at most `batch_size`."""
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
