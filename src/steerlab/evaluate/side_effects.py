"""Side effects of steering on neutral text: perplexity and KL from the unsteered distribution."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from steerlab.data import encode
from steerlab.data.batching import pad_batch
from steerlab.models import LoadedModel


@dataclass(frozen=True)
class NeutralText:
    """Tokenised neutral texts, padded once, and the unsteered log-probabilities at every position."""

    ids: torch.Tensor
    mask: torch.Tensor
    base_logprobs: torch.Tensor  # (N, T-1, vocab) float32, position t predicts token t+1


@torch.no_grad()
def _logprobs(
    lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, progress: bool
) -> torch.Tensor:
    """Next-token log-probabilities (N, T-1, vocab), `batch_size` texts per forward pass."""
    parts = []
    starts = range(0, ids.shape[0], batch_size)
    for start in tqdm(starts, desc="neutral text", disable=not progress, unit="batch"):
        rows = slice(start, start + batch_size)
        logits = lm.model(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False).logits[:, :-1]
        parts.append(logits.float().log_softmax(-1))
    return torch.cat(parts)


def prepare_neutral(
    lm: LoadedModel, texts: Sequence[str], batch_size: int = 16, progress: bool = False
) -> NeutralText:
    """Tokenise `texts` and record the unsteered next-token distributions (call outside any steering)."""
    ids, mask = pad_batch([encode(lm.tokenizer, t) for t in texts], lm.tokenizer.pad_token_id or 0, lm.device)
    return NeutralText(ids, mask, _logprobs(lm, ids, mask, batch_size, progress))


@dataclass(frozen=True)
class SideEffects:
    perplexity: float
    kl: float  # mean KL(unsteered || current) over predicted positions, nats


def side_effects(
    lm: LoadedModel, neutral: NeutralText, batch_size: int = 16, progress: bool = False
) -> SideEffects:
    """Perplexity of the neutral texts and KL from the unsteered distribution, under current hooks."""
    logprobs = _logprobs(lm, neutral.ids, neutral.mask, batch_size, progress)
    valid = neutral.mask[:, 1:].bool() & neutral.mask[:, :-1].bool()
    targets = neutral.ids[:, 1:]
    nll = -logprobs.gather(-1, targets[..., None])[..., 0][valid]
    base = neutral.base_logprobs
    kl = (base.exp() * (base - logprobs)).sum(-1)[valid]
    return SideEffects(perplexity=float(nll.double().mean().exp()), kl=float(kl.double().mean()))
