"""Behaviour metrics from next-token probabilities: A/B answer choice and word-list preference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from steerlab.data import ABDataset, ClozeItem, encode, format_prompt, locate_answers
from steerlab.data.batching import batches_by_length, pad_batch
from steerlab.errors import UserError
from steerlab.models import LoadedModel


@torch.no_grad()
def last_token_logprobs(
    lm: LoadedModel,
    sequences: Sequence[list[int]],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "scoring",
) -> torch.Tensor:
    """Log-probabilities (N, vocab) of the token following each sequence (right-padded batches)."""
    out: list[torch.Tensor | None] = [None] * len(sequences)
    pad_id = lm.tokenizer.pad_token_id or 0
    groups = batches_by_length([len(s) for s in sequences], batch_size)
    for group in tqdm(groups, desc=desc, disable=not progress, unit="batch"):
        ids, mask = pad_batch([sequences[i] for i in group], pad_id, lm.device)
        last = (mask.sum(-1) - 1)[:, None]
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=last).logits
        if logits.shape[1] != 1:  # a model that ignores per-row logits_to_keep
            logits = logits.gather(1, last[..., None].expand(-1, 1, logits.shape[-1]))
        logprobs = logits[:, 0].float().log_softmax(-1).cpu()
        for row, index in enumerate(group):
            out[index] = logprobs[row]
    return torch.stack(out)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ABPrompts:
    """Tokenised A/B prompts: the shared prefix and the answer-letter token of every offered option."""

    prefixes: list[list[int]]
    option_tokens: list[list[int]]
    matching_index: list[int]


def prepare_ab(lm: LoadedModel, dataset: ABDataset, system_prompt: str | None = None) -> ABPrompts:
    prefixes, option_tokens, matching = [], [], []
    for item in dataset:
        prompt = format_prompt(lm.tokenizer, item.question, system_prompt=system_prompt)
        try:
            where = locate_answers(lm.tokenizer, prompt, list(item.options))
        except UserError as error:
            raise UserError(f"{item.source or dataset.source or dataset.name}: {error}") from None
        prefixes.append(where.prefix_ids)
        option_tokens.append(where.answer_token_ids)
        matching.append(list(item.options).index(item.matching))
    return ABPrompts(prefixes, option_tokens, matching)


def prepare_cloze(lm: LoadedModel, items: Sequence[ClozeItem], source: str = "cloze items") -> ABPrompts:
    """Cloze items as `ABPrompts`, so `ab_scores` compares the choices' next-token probabilities: each
    "stem choice" is encoded as plain text (no chat template); the prefix is the tokens all choices share
    and each option is the first token after it (" Paris" for a BPE tokenizer). Comparing those tokens'
    probabilities compares the choices' probabilities up to where they first differ."""
    prefixes, option_tokens = [], []
    for index, item in enumerate(items):
        encoded = [encode(lm.tokenizer, f"{item.stem.rstrip()} {c.strip()}") for c in item.choices]
        shared = 0
        while all(len(e) > shared + 1 and e[shared] == encoded[0][shared] for e in encoded):
            shared += 1
        tokens = [e[shared] for e in encoded]
        if len(set(tokens)) < len(tokens):
            raise UserError(
                f"{source}: item {index} ({item.stem!r}): two choices start with the same token, so their "
                "next-token probabilities cannot tell them apart"
            )
        prefixes.append(encoded[0][:shared])
        option_tokens.append(tokens)
    return ABPrompts(prefixes, option_tokens, [item.answer for item in items])


@dataclass(frozen=True)
class ABScores:
    """Per item: p(matching answer) and p(first option, "A"), normalised over the offered letters, and
    the chance level 1 / (number of offered options) that p_matching is compared with."""

    p_matching: torch.Tensor
    p_first: torch.Tensor
    chance: torch.Tensor


def ab_scores(lm: LoadedModel, prompts: ABPrompts, batch_size: int = 16, progress: bool = False) -> ABScores:
    """Score every prepared A/B prompt under the hooks currently in place."""
    logprobs = last_token_logprobs(lm, prompts.prefixes, batch_size, progress, desc="A/B items")
    p_matching, p_first = [], []
    for row, tokens in enumerate(prompts.option_tokens):
        probs = logprobs[row, tokens].double().softmax(-1)
        p_matching.append(probs[prompts.matching_index[row]])
        p_first.append(probs[0])
    chance = torch.tensor([1.0 / len(tokens) for tokens in prompts.option_tokens], dtype=torch.float64)
    return ABScores(torch.stack(p_matching), torch.stack(p_first), chance)


def first_tokens(tokenizer, words: Sequence[str]) -> list[int]:
    """The first token of each word as it appears after a space."""
    return sorted({tokenizer(" " + word.strip(), add_special_tokens=False).input_ids[0] for word in words})


@dataclass(frozen=True)
class WordPreference:
    """Next-token preference for positive over negative words after each prompt."""

    prompts: list[list[int]]
    positive_tokens: list[int]
    negative_tokens: list[int]


def prepare_word_preference(
    lm: LoadedModel, prompts: Sequence[str], positive_words: Sequence[str], negative_words: Sequence[str]
) -> WordPreference:
    pos, neg = first_tokens(lm.tokenizer, positive_words), first_tokens(lm.tokenizer, negative_words)
    shared = set(pos) & set(neg)
    pos, neg = [t for t in pos if t not in shared], [t for t in neg if t not in shared]
    if not pos or not neg:
        raise UserError("the positive and negative word lists share every first token")
    return WordPreference([encode(lm.tokenizer, p) for p in prompts], pos, neg)


def word_preference(
    lm: LoadedModel, prepared: WordPreference, batch_size: int = 16, progress: bool = False
) -> torch.Tensor:
    """p(positive) = P(positive words) / (P(positive words) + P(negative words)) for each prompt."""
    logprobs = last_token_logprobs(lm, prepared.prompts, batch_size, progress, desc="prompts").double()
    pos = logprobs[:, prepared.positive_tokens].logsumexp(-1)
    neg = logprobs[:, prepared.negative_tokens].logsumexp(-1)
    return torch.sigmoid(pos - neg)
