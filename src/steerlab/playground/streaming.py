"""Token-by-token generation through the library's own `steerlab.evaluate.generate`, and the change in
each generated token's log-probability between the unsteered and the steered model.

`generate` is called exactly as a user would call it (greedy, the same formatting and batching); a
streamer passed through to Hugging Face's `generate` reports every new token as it is chosen, so the
streamed tokens are the library's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from steerlab.evaluate import generate
from steerlab.models import LoadedModel


class Cancelled(Exception):
    """The client went away: generation stops at the next token."""


@dataclass
class Generation:
    """One side's result: the prompt's token ids, the generated ids, each token's text, the final text."""

    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    text: str = ""


class TokenStreamer(BaseStreamer):
    """Collects the prompt and each generated token; calls `on_token(id, piece)` as each one arrives.

    `piece` is the text the token adds to the decoded continuation (special tokens decode to ""); a
    token that ends inside a multi-byte character adds "" and the character comes with the next one.
    """

    def __init__(
        self,
        tokenizer,
        on_token: Callable[[int, str], None] = lambda token, piece: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.cancelled = cancelled
        self.result = Generation()
        self._started = False
        self._shown = ""

    def put(self, value: torch.Tensor) -> None:
        if not self._started:
            self._started = True
            self.result.prompt_ids = [int(t) for t in value.reshape(-1)]
            return
        if self.cancelled():
            raise Cancelled
        for token in value.reshape(-1).tolist():
            self.result.ids.append(int(token))
            text = self.tokenizer.decode(self.result.ids, skip_special_tokens=True)
            piece = "" if text.endswith("\ufffd") else text[len(self._shown) :]
            if piece:
                self._shown = text
            self.result.pieces.append(piece)
            self.on_token(int(token), piece)

    def end(self) -> None:
        pass


def stream_generation(
    lm: LoadedModel,
    prompt: str,
    context: AbstractContextManager | None = None,
    *,
    max_new_tokens: int = 48,
    chat: bool = True,
    system_prompt: str | None = None,
    on_token: Callable[[int, str], None] = lambda token, piece: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> Generation:
    """`steerlab.evaluate.generate(lm, [prompt], ...)` inside `context`, reporting each token."""
    streamer = TokenStreamer(lm.tokenizer, on_token, cancelled)
    with context or nullcontext():
        (text,) = generate(
            lm,
            [prompt],
            max_new_tokens=max_new_tokens,
            chat=chat,
            system_prompt=system_prompt,
            streamer=streamer,
        )
    streamer.result.text = text
    return streamer.result


@torch.no_grad()
def token_logprobs(lm: LoadedModel, prompt_ids: list[int], ids: list[int]) -> list[float]:
    """log p(ids[i] | prompt, ids[:i]) under the hooks in place, computed as generation computes it: the
    prompt in one call, then the continuation as a cached call, so position specs that distinguish
    prompt from decode steps ("decode", "from:K") select the same tokens as during generation."""
    if not ids:
        return []
    device = lm.device
    prompt = torch.tensor([prompt_ids], device=device)
    first = lm.model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
    logits = [first.logits[0, -1:]]
    if len(ids) > 1:
        rest = torch.tensor([ids[:-1]], device=device)
        mask = torch.ones(1, len(prompt_ids) + len(ids) - 1, dtype=torch.long, device=device)
        second = lm.model(
            input_ids=rest, attention_mask=mask, past_key_values=first.past_key_values, use_cache=True
        )
        logits.append(second.logits[0])
    logprobs = torch.cat(logits).double().log_softmax(-1)
    chosen = logprobs.gather(-1, torch.tensor(ids, device=device)[:, None])[:, 0]
    return [float(x) for x in chosen.cpu()]
