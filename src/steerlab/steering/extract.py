"""Mean-difference extraction: CAA on A/B pairs, and paired free texts.

Activations are never stored: each batch adds its float64 sums at the read positions, and the forward
pass stops after the last layer needed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version

import torch
from tqdm.auto import tqdm

import steerlab
from steerlab.data import (
    ABDataset,
    PairedTexts,
    ReadSpec,
    batches_by_length,
    encode,
    format_prompt,
    locate_answers,
    pad_batch,
)
from steerlab.data.templating import prompt_metadata
from steerlab.errors import UserError
from steerlab.hooks import run_to_layers
from steerlab.models import LoadedModel, resolve_layer
from steerlab.steering.vector import SteeringVector, tensor_problem


@dataclass
class LayerMeans:
    """Per-layer mean activation (float64) and mean residual norm over a set of ReadSpecs."""

    mean: dict[int, torch.Tensor]
    residual_norm: dict[int, float]
    count: int


@torch.no_grad()
def mean_activations(
    lm: LoadedModel,
    examples: Sequence[ReadSpec],
    layers: Sequence[int],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "reading activations",
) -> LayerMeans:
    """Mean residual-stream activation at each layer over the read positions of `examples`."""
    model = lm.model
    resolved = sorted({resolve_layer(model, layer) for layer in layers})
    width = lm.info.hidden_size
    sums = {layer: torch.zeros(width, dtype=torch.float64, device=lm.device) for layer in resolved}
    norm_sums = {layer: torch.zeros((), dtype=torch.float64, device=lm.device) for layer in resolved}
    pad_id = lm.tokenizer.pad_token_id or 0
    groups = batches_by_length([len(ex.ids) for ex in examples], batch_size)
    for group in tqdm(groups, desc=desc, disable=not progress, unit="batch"):
        batch = [examples[i] for i in group]
        ids, mask = pad_batch([ex.ids for ex in batch], pad_id, lm.device)
        flat, weights = [], []
        for row, ex in enumerate(batch):
            flat.extend(row * ids.shape[1] + p for p in ex.positions)
            weights.extend([1.0 / len(ex.positions)] * len(ex.positions))
        flat_t = torch.tensor(flat, device=lm.device)
        w_t = torch.tensor(weights, dtype=torch.float64, device=lm.device)

        def accumulate(layer: int, hidden: torch.Tensor, flat_t=flat_t, w_t=w_t) -> None:
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_t).double()
            sums[layer] += w_t @ picked
            norm_sums[layer] += w_t @ picked.norm(dim=-1)

        run_to_layers(model, resolved, accumulate, input_ids=ids, attention_mask=mask)
    n = len(examples)
    return LayerMeans(
        mean={layer: s / n for layer, s in sums.items()},
        residual_norm={layer: float(s) / n for layer, s in norm_sums.items()},
        count=n,
    )


def _metadata(lm: LoadedModel, method: str, pos: LayerMeans, neg: LayerMeans, vectors: dict, **extra) -> dict:
    return {
        "method": method,
        "model": lm.info.to_dict(),
        "layers": sorted(vectors),
        "norms": {str(layer): float(vec.norm()) for layer, vec in vectors.items()},
        "residual_norms": {
            str(layer): 0.5 * (pos.residual_norm[layer] + neg.residual_norm[layer]) for layer in vectors
        },
        "tokenizer_repairs": lm.info.tokenizer_repairs,
        "versions": {
            "steerlab": steerlab.__version__,
            "torch": torch.__version__,
            "transformers": version("transformers"),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def difference_vector(
    lm: LoadedModel,
    positive: Sequence[ReadSpec],
    negative: Sequence[ReadSpec],
    layers: Sequence[int],
    method: str,
    batch_size: int = 8,
    progress: bool = True,
    **metadata,
) -> SteeringVector:
    """mean(positive activations) - mean(negative activations) at each layer."""
    if not positive or not negative:
        raise UserError(
            f"{method}: no examples to extract from ({len(positive)} positive, {len(negative)} negative)"
        )
    pos = mean_activations(lm, positive, layers, batch_size, progress, desc="positive")
    neg = mean_activations(lm, negative, layers, batch_size, progress, desc="negative")
    vectors = {layer: (pos.mean[layer] - neg.mean[layer]).float().cpu() for layer in pos.mean}
    check_extracted(lm, method, vectors)
    return SteeringVector(vectors, _metadata(lm, method, pos, neg, vectors, **metadata))


def check_extracted(lm: LoadedModel, method: str, vectors: dict[int, torch.Tensor]) -> None:
    """Refuse a non-finite or zero extracted vector, saying why (overflow, or sides that read the same)."""
    problem = tensor_problem(vectors)
    if problem:
        overflow = not all(bool(torch.isfinite(vec).all()) for vec in vectors.values())
        why = (
            f"the model overflows in {lm.dtype}; try float32"
            if overflow
            else "the positive and negative examples give the same activations"
        )
        raise UserError(f"{method}: {problem} ({why})")


def ab_read_specs(
    lm: LoadedModel, dataset: ABDataset, system_prompt: str | None
) -> tuple[list[ReadSpec], list[ReadSpec]]:
    """For each item: the prompt + matching / + not-matching answer, read at the answer-letter token."""
    positive, negative = [], []
    for item in dataset:
        prompt = format_prompt(lm.tokenizer, item.question, system_prompt=system_prompt)
        where = locate_answers(lm.tokenizer, prompt, [item.matching, item.not_matching])
        positive.append(ReadSpec(where.option_ids[0], [where.position]))
        negative.append(ReadSpec(where.option_ids[1], [where.position]))
    return positive, negative


def caa_items(dataset: ABDataset, *, balance: bool = True, seed: int = 0) -> ABDataset:
    """The items CAA reads: `dataset` with balanced answer letters (unless `balance=False`).

    Needs no model, so a command can call it to refuse unusable data before loading one; raises a
    `DataFormatError` when no item is left.
    """
    if not len(dataset):
        raise UserError(f"{dataset.source or dataset.name or 'A/B dataset'}: holds no items")
    return dataset.balance_letters(seed=seed) if balance else dataset


def check_system_prompt(system_prompt: str | None, chat: bool) -> None:
    """Free texts take a system prompt only inside the chat template; a `UserError` otherwise."""
    if system_prompt is not None and not chat:
        raise UserError("--system-prompt: paired texts take a system prompt only with --chat (chat=True)")


def _dataset_metadata(dataset, source: str | None, **extra) -> dict:
    return {
        "name": dataset.name,
        "source": source if source is not None else (dataset.source or None),
        "fingerprint": dataset.fingerprint,
        "size": len(dataset),
        **extra,
    }


def extract_caa(
    lm: LoadedModel,
    dataset: ABDataset,
    layers: Sequence[int],
    *,
    system_prompt: str | None = None,
    balance: bool = True,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    source: str | None = None,
    unbalanced: ABDataset | None = None,
) -> SteeringVector:
    """Contrastive Activation Addition: mean difference at the answer letter of A/B pairs.

    With `balance=True` (default) the answer letters are balanced first, so the A-versus-B letter
    direction cancels instead of leaking into the vector. `source` (default: the file the dataset was
    loaded from) is recorded in the metadata with the prompt format and the system prompt used.
    unbalanced: the data before balancing, when `dataset` is already `caa_items(unbalanced)` (pass
    `balance=False`), so that the metadata records the counts before balancing.
    """
    before = dataset if unbalanced is None else unbalanced
    used = caa_items(dataset, balance=balance, seed=seed)
    positive, negative = ab_read_specs(lm, used, system_prompt)
    return difference_vector(
        lm,
        positive,
        negative,
        layers,
        method="caa",
        batch_size=batch_size,
        progress=progress,
        dataset=_dataset_metadata(
            used,
            source,
            size_before_balancing=len(before),
            letter_counts_before_balancing=before.letter_counts(),
            letter_counts=used.letter_counts(),
        ),
        **prompt_metadata(lm.tokenizer, system_prompt),
    )


def text_read_spec(lm: LoadedModel, text: str, read: str, system_prompt: str | None, chat: bool) -> ReadSpec:
    """Tokenise one free text; read its last token or average its positions (never position 0)."""
    if chat:
        text = format_prompt(lm.tokenizer, text, system_prompt=system_prompt)
    ids = encode(lm.tokenizer, text)
    if read == "last":
        positions = [len(ids) - 1]
    elif read == "mean":
        positions = list(range(1, len(ids))) or [0]
    else:
        raise UserError(f"read must be 'last' or 'mean', got {read!r}")
    return ReadSpec(ids, positions)


def extract_mean_difference(
    lm: LoadedModel,
    texts: PairedTexts,
    layers: Sequence[int],
    *,
    read: str = "last",
    system_prompt: str | None = None,
    chat: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    source: str | None = None,
) -> SteeringVector:
    """Mean difference between paired positive and negative free texts (last token or all positions).

    With `chat=True` each text is a user turn of the chat template (with `system_prompt`, which needs
    it). `source` (default: the file the texts were loaded from) is recorded in the metadata.
    """
    check_system_prompt(system_prompt, chat)
    positive = [text_read_spec(lm, t, read, system_prompt, chat) for t in texts.positive]
    negative = [text_read_spec(lm, t, read, system_prompt, chat) for t in texts.negative]
    return difference_vector(
        lm,
        positive,
        negative,
        layers,
        method=f"mean-difference-{read}",
        batch_size=batch_size,
        progress=progress,
        dataset=_dataset_metadata(texts, source),
        **prompt_metadata(lm.tokenizer, system_prompt, chat=chat),
    )


# --- prompt difference: mean residual at the last prompt token, one prompt set against another ---


def extract_prompt_difference(
    lm: LoadedModel,
    positive_prompts: Sequence[str],
    negative_prompts: Sequence[str],
    layers: Sequence[int],
    read: str = "last",
    chat: bool = True,
    system_prompt: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> SteeringVector:
    """mean(residual | positive prompts) - mean(residual | negative prompts) at each layer.

    The prompts need not be paired (e.g. harmful versus harmless instructions: the refusal direction).
    With `chat=True` (default) each prompt is a user turn of the chat template, read at its last token
    (the end of the generation prompt, where the reply is decided) or averaged over its positions with
    `read="mean"`; position 0 (BOS / the attention sink) is never read.
    """
    check_system_prompt(system_prompt, chat)
    for side, prompts in (("positive_prompts", positive_prompts), ("negative_prompts", negative_prompts)):
        if isinstance(prompts, str):
            raise UserError(f"{side}: expected a list of prompts, got one string")
        if not prompts:
            raise UserError(f"{side}: no prompt given")
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise UserError(f"{side}: every prompt must be a non-empty string")
    positive = [text_read_spec(lm, p, read, system_prompt, chat) for p in positive_prompts]
    negative = [text_read_spec(lm, p, read, system_prompt, chat) for p in negative_prompts]
    if any(spec.positions == [0] for spec in (*positive, *negative)):
        raise UserError("a prompt is a single token: position 0 (the attention sink) is never read")
    return difference_vector(
        lm,
        positive,
        negative,
        layers,
        method=f"prompt-difference-{read}",
        batch_size=batch_size,
        progress=progress,
        dataset={"positive": len(positive), "negative": len(negative)},
        **prompt_metadata(lm.tokenizer, system_prompt, chat=chat),
    )
