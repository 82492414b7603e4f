"""Perplexity of a passage under the model as it is (with whatever steering hooks are in place).

The passage is encoded once (with BOS where the tokenizer adds one) and read in windows of at most
`context_length` tokens that start `stride` tokens apart; each token after the first is predicted exactly
once, by the first window that holds it together with at least one token before it; so with `stride` <
`context_length` every prediction after the first window sees at least `context_length - stride` tokens
of context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from steerlab.data import encode
from steerlab.data.batching import pad_batch
from steerlab.errors import UserError
from steerlab.models import LoadedModel
from steerlab.options import check_at_least


@dataclass(frozen=True)
class PassagePerplexity:
    """exp(mean NLL) over the passage's predicted tokens, with the per-token NLL (nats, float64)."""

    token_nll: torch.Tensor  # (T - 1,): the NLL of token t + 1 given the tokens before it (in its window)
    context_length: int
    stride: int

    @property
    def n_tokens(self) -> int:
        return len(self.token_nll)

    @property
    def mean_nll(self) -> float:
        return float(self.token_nll.mean())

    @property
    def perplexity(self) -> float:
        return float(self.token_nll.mean().exp())


def model_context_length(lm: LoadedModel) -> int:
    """The model's longest input (max_position_embeddings or n_positions), 2048 when it states none."""
    config = lm.model.config
    return int(
        getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    )


def windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first target) of each window: it reads tokens [start, end) and scores targets
    [first target, end); the targets of all windows cover 1..n_tokens-1 once."""
    out, scored = [], 1
    start = 0
    while scored < n_tokens:
        end = min(start + context_length, n_tokens)
        if end > scored:
            out.append((start, end, scored))
            scored = end
        start += stride
    return out


@torch.no_grad()
def passage_perplexity(
    lm: LoadedModel,
    text: str,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> PassagePerplexity:
    """Perplexity of `text` under the current hooks, read in windows (see the module).

    `context_length` defaults to `min(model_context_length(lm), 1024)`; `stride` to `context_length - 1`
    (consecutive windows overlap by one token, so every token is predicted from within its window).
    """
    context = context_length or min(model_context_length(lm), 1024)
    check_at_least(context, 2, "--context-length")
    step = stride if stride is not None else context - 1
    check_at_least(step, 1, "--stride")
    if step >= context:
        raise UserError(f"--stride: must be below the context length {context}, got {step}")
    ids = encode(lm.tokenizer, text)
    if len(ids) < 2:
        raise UserError("passage_perplexity: the passage has fewer than two tokens")
    token_ids = torch.tensor(ids)
    spans = windows(len(ids), context, step)
    nll = torch.empty(len(ids) - 1, dtype=torch.float64)
    pad_id = lm.tokenizer.pad_token_id or 0
    groups = [spans[i : i + batch_size] for i in range(0, len(spans), batch_size)]
    for group in tqdm(groups, desc="passage", disable=not progress, unit="batch"):
        batch, mask = pad_batch([ids[s:e] for s, e, _ in group], pad_id, lm.device)
        logits = lm.model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float()
        for row, (start, end, first) in enumerate(group):
            scores = logits[row, first - 1 - start : end - 1 - start].cpu()
            targets = token_ids[first:end]
            picked = scores.gather(-1, targets[:, None])[:, 0]
            nll[first - 1 : end - 1] = (scores.logsumexp(-1) - picked).double()
    return PassagePerplexity(nll, context, step)
