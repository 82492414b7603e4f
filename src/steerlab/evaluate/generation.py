"""Open-ended generation, optionally under steering hooks (use inside `vector.apply(...)`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steerlab.data import encode, format_prompt
from steerlab.data.batching import pad_batch
from steerlab.models import LoadedModel


@torch.no_grad()
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
    sequences = [encode(tokenizer, t) for t in texts]
    outputs: list[str] = []
    kwargs = {"do_sample": False, **generate_kwargs}
    if not kwargs["do_sample"]:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    starts = range(0, len(sequences), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress, unit="batch"):
        ids, mask = pad_batch(
            sequences[start : start + batch_size], tokenizer.pad_token_id or 0, lm.device, left=True
        )
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        outputs.extend(tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True))
    return [text.strip() for text in outputs]
