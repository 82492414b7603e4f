"""Token batches for the language-model task: training blocks and prompt/completion queries."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from steerlab.errors import UserError

__all__ = ["QueryError", "lm_batch", "query_batch", "text_blocks"]


class QueryError(UserError):
    """A query is not token ids, or its prompt or completion is empty."""


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


def _ints(seq) -> list[int] | None:
    """`seq` as a list of ints (a 1-D tensor or a sequence of integers), else None."""
    if isinstance(seq, torch.Tensor):
        return seq.tolist() if seq.dim() == 1 and not seq.is_floating_point() else None
    if isinstance(seq, Sequence) and not isinstance(seq, str):
        if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in seq):
            return [int(t) for t in seq]
    return None


def _examples(ids, what: str) -> list[list[int]]:
    """One example (token ids: a list of ints or a 1-D tensor) or several (lists of them, a 2-D tensor)."""
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        ids = list(ids)
    if isinstance(ids, Sequence) and not isinstance(ids, str) and len(ids) == 0:
        raise QueryError(f"query_batch: {what} is empty")
    one = _ints(ids)
    if one is not None:
        return [one]
    many = [_ints(e) for e in ids] if isinstance(ids, Sequence) and not isinstance(ids, str) else [None]
    if any(e is None for e in many):
        raise QueryError(
            f"query_batch: {what} must be token ids (a list of ints) or a list of such lists, got {ids!r:.60}"
        )
    return many  # type: ignore[return-value]


def query_batch(prompts, completions, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Prompt + completion sequences with loss on the completion tokens only. `prompts` and `completions`
    are one example each (`query_batch(prompt_ids, completion_ids)`) or lists of examples."""
    prompts, completions = _examples(prompts, "prompts"), _examples(completions, "completions")
    if len(prompts) != len(completions):
        raise QueryError(f"query_batch: {len(prompts)} prompts but {len(completions)} completions")
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not p or not c:
            raise QueryError(
                f"query_batch: query {i} has an empty {'prompt' if not p else 'completion'}; "
                "its completion would carry no loss"
            )
    seqs = [p + c for p, c in zip(prompts, completions)]
    return lm_batch(seqs, [len(p) for p in prompts], pad_id)


def text_blocks(token_ids: Sequence[int], block_size: int, n_blocks: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping blocks of `block_size` tokens (the last partial block dropped)."""
    blocks = [
        list(token_ids[i : i + block_size]) for i in range(0, len(token_ids) - block_size + 1, block_size)
    ]
    return blocks if n_blocks is None else blocks[:n_blocks]
