"""Open-ended generation, optionally under steering hooks (use inside `vector.apply(...)`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steerlab.data import encode, format_prompt
from steerlab.data.batching import pad_batch
from steerlab.models import LoadedModel


@torch.no_grad()
def generate_ids(
    lm: LoadedModel,
    sequences: Sequence[list[int]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    use_cache: bool = True,
    progress: bool = False,
    **generate_kwargs,
) -> list[list[int]]:
    """The new token ids `lm.model.generate` appends to each tokenised input (greedy by default), batched
    with left padding; rows that stop early are filled with the pad id after their EOS."""
    tokenizer = lm.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"do_sample": False, **generate_kwargs}
    if not kwargs["do_sample"]:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    replies: list[list[int]] = []
    starts = range(0, len(sequences), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress, unit="batch"):
        batch = sequences[start : start + batch_size]
        ids, mask = pad_batch(batch, tokenizer.pad_token_id or 0, lm.device, left=True)
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        replies.extend(out[:, ids.shape[1] :].tolist())
    return replies


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    chat: bool = True,
    system_prompt: str | None = None,
    batch_size: int = 8,
    use_cache: bool = True,
    progress: bool = False,
    **generate_kwargs,
) -> list[str]:
    """Greedy (by default) continuations of `prompts`, batched with left padding."""
    tokenizer = lm.tokenizer
    texts = [format_prompt(tokenizer, p, system_prompt=system_prompt) if chat else p for p in prompts]
    replies = generate_ids(
        lm,
        [encode(tokenizer, t) for t in texts],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        use_cache=use_cache,
        progress=progress,
        **generate_kwargs,
    )
    return [text.strip() for text in tokenizer.batch_decode(replies, skip_special_tokens=True)]
