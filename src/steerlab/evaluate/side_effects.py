"""Side effects of steering on neutral text: perplexity and KL from the unsteered distribution."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

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

    @cached_property
    def base_probs(self) -> torch.Tensor:
        """exp(base_logprobs), computed once."""
        return self.base_logprobs.exp()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over the last dimension of a * b, without materialising the product."""
    return torch.einsum("ntv,ntv->nt", a, b)


@torch.no_grad()
def _logprob_batches(
    lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, progress: bool
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, next-token log-probabilities (rows, T-1, vocab)), `batch_size` texts per forward pass."""
    starts = range(0, ids.shape[0], batch_size)
    for start in tqdm(starts, desc="neutral text", disable=not progress, unit="batch"):
        rows = slice(start, start + batch_size)
        logits = lm.model(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False).logits[:, :-1]
        yield rows, logits.float().log_softmax(-1)


def prepare_neutral(
    lm: LoadedModel, texts: Sequence[str], batch_size: int = 16, progress: bool = False
) -> NeutralText:
    """Tokenise `texts` and record the unsteered next-token distributions (call outside any steering)."""
    ids, mask = pad_batch([encode(lm.tokenizer, t) for t in texts], lm.tokenizer.pad_token_id or 0, lm.device)
    parts = [logprobs for _, logprobs in _logprob_batches(lm, ids, mask, batch_size, progress)]
    return NeutralText(ids, mask, torch.cat(parts))


@dataclass(frozen=True)
class SideEffects:
    perplexity: float
    kl: float  # mean KL(unsteered || current) over predicted positions, nats


def side_effects(
    lm: LoadedModel, neutral: NeutralText, batch_size: int = 16, progress: bool = False
) -> SideEffects:
    """Perplexity of the neutral texts and KL from the unsteered distribution, under current hooks.

    KL(p || q) = sum p (log p - log q), with p = exp(log p) of the unsteered texts computed once.
    """
    targets = neutral.ids[:, 1:]
    nll, kl = [], []
    for rows, logprobs in _logprob_batches(lm, neutral.ids, neutral.mask, batch_size, progress):
        nll.append(-logprobs.gather(-1, targets[rows][..., None])[..., 0])
        kl.append(_dot(neutral.base_probs[rows], neutral.base_logprobs[rows] - logprobs))
    valid = neutral.mask[:, 1:].bool() & neutral.mask[:, :-1].bool()
    nll_valid, kl_valid = torch.cat(nll)[valid], torch.cat(kl)[valid]
    return SideEffects(perplexity=float(nll_valid.double().mean().exp()), kl=float(kl_valid.double().mean()))
