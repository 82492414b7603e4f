"""Norm-bounded activation attacks at one layer L.

A perturbation delta (D,) — or one per prompt, (N, D) — is added to the residual stream after block L at
every prompt position except position 0 (the attention sink) and at every generated token
(`Positions.all()`). Its norm is at most `radius` = eps x the mean residual norm at L, measured on the
attacked prompts (positions 1.., padding excluded).

Optimisation runs only the layers from L upward: the input of block L is computed once per batch
(`record_block_input`) and each step starts the forward pass there (`start_at_block`), with the
perturbation added by the gradient-carrying `hooks.add`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from steerlab.data import encode, format_prompt
from steerlab.data.batching import pad_batch
from steerlab.data.templating import encode_continuation
from steerlab.evaluate.judges import COMPLIANCE_STARTS, REFUSAL_STARTS
from steerlab.hooks import (
    Positions,
    add,
    as_module,
    capture_residual,
    no_param_grads,
    record_block_input,
    run_to_layers,
    start_at_block,
)
from steerlab.models import LoadedModel, hidden_size

POSITIONS = Positions.all()
"""Where a perturbation goes: every prompt position but the sink, and every generated token."""

COMPLIANCE_TARGET = "Sure, here is"


@dataclass
class Batch:
    """Left-padded token rows; each row may end in target tokens (right-aligned in `targets`).

    targets: (B, K) token ids, -100 where a row has fewer than K target tokens; K = 0 for no target.
    Logits at the last K + 1 positions cover every target prediction and the reply's first token.
    rows: the indices of these rows in the caller's prompt list.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    rows: list[int]
    prompt_len: torch.Tensor  # (B,) real prompt tokens per row (target excluded)

    @property
    def k(self) -> int:
        return int(self.targets.shape[1])


def chat_ids(lm: LoadedModel, prompt: str, chat: bool = True) -> list[int]:
    return encode(lm.tokenizer, format_prompt(lm.tokenizer, prompt) if chat else prompt)


def _target_ids(lm: LoadedModel, prompt: str, target: str, chat: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids): prompt + target encoded whole, split where it leaves the prompt's tokens."""
    full, keep = encode_continuation(
        lm.tokenizer, format_prompt(lm.tokenizer, prompt) if chat else prompt, target
    )
    return full[:keep], full[keep:]


def make_batches(
    lm: LoadedModel,
    prompts: Sequence[str],
    target: str | None = None,
    batch_size: int = 16,
    chat: bool = True,
    token_ids: Sequence[list[int]] | None = None,
) -> list[Batch]:
    """Fixed batches of `prompts` (chat-formatted), each row followed by `target`'s tokens when given;
    `token_ids` replaces the prompts by ready token lists (no target)."""
    rows = []
    for i in range(len(token_ids) if token_ids is not None else len(prompts)):
        if token_ids is not None:
            rows.append((list(token_ids[i]), []))
        elif target:
            rows.append(_target_ids(lm, prompts[i], target, chat))
        else:
            rows.append((chat_ids(lm, prompts[i], chat), []))
    pad = lm.tokenizer.pad_token_id or 0
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = pad_batch([p + t for p, t in chunk], pad, lm.device, left=True)
        k = max(len(t) for _, t in chunk)
        targets = torch.full((len(chunk), k), -100, dtype=torch.long)
        for r, (_, t) in enumerate(chunk):
            if t:
                targets[r, k - len(t) :] = torch.tensor(t)
        plen = torch.tensor([len(p) for p, _ in chunk])
        batches.append(Batch(ids, mask, targets.to(lm.device), list(range(start, start + len(chunk))), plen))
    return batches


def block_input(lm: LoadedModel, layer: int, batch: Batch) -> torch.Tensor:
    """The hidden states entering block `layer` for `batch` (blocks above it are not run)."""
    model = as_module(lm)
    with torch.no_grad(), record_block_input(model, layer) as seen:
        run_to_layers(
            model, [layer], lambda _layer, _hidden: None, input_ids=batch.ids, attention_mask=batch.mask
        )
    return seen[0]


def residual_stats(lm: LoadedModel, layer: int, batches: Sequence[Batch]) -> tuple[float, torch.Tensor]:
    """(mean residual norm at `layer` over prompt positions 1.. of every row, last-prompt-token residuals
    (N, D) in float64), the residual being block `layer`'s output without any perturbation."""
    model = as_module(lm)
    norms: list[torch.Tensor] = []
    last: list[torch.Tensor] = []
    for batch in batches:
        with torch.no_grad(), capture_residual(model, [layer]) as kept:
            model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
        hidden = next(iter(kept.values())).double()
        width = batch.ids.shape[1]
        for r in range(hidden.shape[0]):
            end = width - batch.k + int((batch.targets[r] < 0).sum()) if batch.k else width
            begin = end - int(batch.prompt_len[r])
            norms.append(hidden[r, begin + 1 : end].norm(dim=-1))
            last.append(hidden[r, end - 1])
    return float(torch.cat(norms).mean()), torch.stack(last)


def forward_logits(
    lm: LoadedModel,
    layer: int,
    batch: Batch,
    delta: torch.Tensor | None,
    cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, K + 1, V) at the last K + 1 positions with `delta` added after block `layer`;
    `cache` (the block's input from `block_input`) skips the blocks below `layer`."""
    model = as_module(lm)
    with ExitStack() as stack:
        if cache is not None:
            stack.enter_context(start_at_block(model, layer, cache))
        if delta is not None:
            stack.enter_context(add(model, {layer: delta}, POSITIONS))
        out = model(
            input_ids=batch.ids, attention_mask=batch.mask, use_cache=False, logits_to_keep=batch.k + 1
        )
    return out.logits


def first_tokens(lm: LoadedModel, starts: Sequence[str]) -> list[int]:
    """The first reply token of each start (after the chat template's assistant turn)."""
    probe = "Hi"
    out = set()
    for start in starts:
        _, target = _target_ids(lm, probe, start, chat=True)
        out.add(target[0])
    return sorted(out)


@dataclass(frozen=True)
class Objective:
    """Per-row loss on logits (B, K + 1, V): 'target' = -log P(target tokens); 'refusal' = the first-token
    refusal score log P(refusal first tokens) - log P(compliance first tokens); a callable for others."""

    kind: str
    refusal_tokens: tuple[int, ...] = ()
    compliance_tokens: tuple[int, ...] = ()
    custom: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.custom is not None:
            return self.custom(logits, batch)
        logp = logits.log_softmax(-1)
        if self.kind == "target":
            predictions = logp[:, :-1]
            valid = batch.targets >= 0
            picked = predictions.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]
            return -(picked * valid).sum(-1)
        first = first_reply_logprobs(logp, batch)
        return refusal_logodds(first, self.refusal_tokens, self.compliance_tokens)


def first_reply_logprobs(logp: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, V) log-probabilities of each row's first reply token (the prediction after its prompt)."""
    k = batch.k
    n_target = (batch.targets >= 0).sum(-1) if k else torch.zeros(logp.shape[0], dtype=torch.long)
    index = (k - n_target).to(logp.device)
    return logp[torch.arange(logp.shape[0], device=logp.device), index]


def refusal_logodds(first: torch.Tensor, refusal: Sequence[int], compliance: Sequence[int]) -> torch.Tensor:
    return first[:, list(refusal)].logsumexp(-1) - first[:, list(compliance)].logsumexp(-1)


def refusal_objective(lm: LoadedModel, kind: str = "target") -> Objective:
    return Objective(
        kind,
        tuple(first_tokens(lm, REFUSAL_STARTS)),
        tuple(first_tokens(lm, COMPLIANCE_STARTS)),
    )


def project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row of `delta` scaled into the ball of `radius` (unchanged if already inside), in place."""
    with torch.no_grad():
        norm = delta.norm(dim=-1, keepdim=True)
        delta.mul_(torch.clamp(radius / norm.clamp(min=1e-30), max=1.0))
    return delta


@dataclass
class Trace:
    """The loss at every optimisation step (mean over the rows of that step's batch)."""

    losses: list[float]


def _caches(
    lm: LoadedModel, layer: int, batches: Sequence[Batch], use_cache: bool
) -> list[torch.Tensor | None]:
    return [block_input(lm, layer, b) if use_cache else None for b in batches]


def _optimiser(delta: torch.Tensor, radius: float, lr: float) -> torch.optim.Optimizer:
    """Adam with a step of about `lr` x radius in norm (per-coordinate lr x radius / sqrt(D))."""
    return torch.optim.Adam([delta], lr=lr * radius / math.sqrt(delta.shape[-1]))


def universal_attack(
    lm: LoadedModel,
    layer: int,
    batches: Sequence[Batch],
    objective: Objective,
    radius: float,
    steps: int = 40,
    lr: float = 0.3,
    init: torch.Tensor | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, Trace]:
    """ONE vector (D,) in the ball of `radius` minimising the mean objective over `batches`: projected
    Adam, one batch per step (cycling)."""
    width = hidden_size(as_module(lm))
    delta = (
        torch.zeros(width, dtype=lm.dtype, device=lm.device) if init is None else init.clone().to(lm.device)
    )
    delta = project(delta.to(lm.dtype), radius).requires_grad_(True)
    opt = _optimiser(delta, radius, lr)
    caches = _caches(lm, layer, batches, use_cache)
    losses = []
    with no_param_grads(as_module(lm)):
        for step in tqdm(range(steps), desc=f"universal L{layer}", disable=not progress, leave=False):
            batch, cache = batches[step % len(batches)], caches[step % len(batches)]
            loss = objective(forward_logits(lm, layer, batch, delta, cache), batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            project(delta, radius)
            losses.append(loss.item())
    return delta.detach(), Trace(losses)


def per_prompt_attack(
    lm: LoadedModel,
    layer: int,
    batches: Sequence[Batch],
    objective: Objective,
    radius: float,
    steps: int = 20,
    lr: float = 0.3,
    use_cache: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, Trace]:
    """One vector per prompt (N, D), each in the ball of `radius`, optimised on its own prompt."""
    width = hidden_size(as_module(lm))
    out = []
    losses = [0.0] * steps
    with no_param_grads(as_module(lm)):
        for batch in tqdm(batches, desc=f"per-prompt L{layer}", disable=not progress, leave=False):
            cache = block_input(lm, layer, batch) if use_cache else None
            delta = torch.zeros(len(batch.rows), width, dtype=lm.dtype, device=lm.device, requires_grad=True)
            opt = _optimiser(delta, radius, lr)
            for step in range(steps):
                loss = objective(forward_logits(lm, layer, batch, delta, cache), batch)
                opt.zero_grad()
                loss.sum().backward()  # rows are independent: each gets its own gradient
                opt.step()
                project(delta, radius)
                losses[step] += loss.sum().item() / sum(len(b.rows) for b in batches)
            out.append(delta.detach())
    return torch.cat(out), Trace(losses)


def _hidden_at(lm: LoadedModel, source: int, target: int, batch: Batch, delta, cache) -> torch.Tensor:
    """Block `target`'s output with `delta` added after block `source`, running blocks source..target."""
    model = as_module(lm)
    kept: list[torch.Tensor] = []
    with ExitStack() as stack:
        stack.enter_context(start_at_block(model, source, cache))
        if delta is not None:
            stack.enter_context(add(model, {source: delta}, POSITIONS))
        run_to_layers(
            model, [target], lambda _l, h: kept.append(h), input_ids=batch.ids, attention_mask=batch.mask
        )
    return kept[0]


def melbo_attack(
    lm: LoadedModel,
    layer: int,
    target_layer: int,
    batches: Sequence[Batch],
    radius: float,
    n_vectors: int = 4,
    steps: int = 20,
    lr: float = 0.3,
    seed: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, Trace]:
    """MELBO (Mack & Turner 2024): `n_vectors` mutually orthogonal vectors of norm `radius` at `layer`,
    each maximising the mean squared change of block `target_layer`'s output over the prompt positions
    (no target text). Returns (n_vectors, D) and the negated objective per step."""
    width = hidden_size(as_module(lm))
    generator = torch.Generator().manual_seed(seed)
    caches = [block_input(lm, layer, b) for b in batches]
    with torch.no_grad():
        base = [_hidden_at(lm, layer, target_layer, b, None, c) for b, c in zip(batches, caches)]
    found: list[torch.Tensor] = []
    losses = []

    def constrain(delta: torch.Tensor) -> None:
        with torch.no_grad():
            for other in found:
                delta -= (delta @ other) / (other @ other) * other
            delta.mul_(radius / delta.norm().clamp(min=1e-30))

    with no_param_grads(as_module(lm)):
        for index in range(n_vectors):
            start = torch.randn(width, generator=generator, dtype=torch.float64).to(lm.device, lm.dtype)
            delta = start.requires_grad_(True)
            constrain(delta)
            opt = _optimiser(delta, radius, lr)
            for step in tqdm(
                range(steps), desc=f"melbo L{layer} #{index}", disable=not progress, leave=False
            ):
                b = step % len(batches)
                moved = _hidden_at(lm, layer, target_layer, batches[b], delta, caches[b]) - base[b]
                mask = batches[b].mask.to(moved.dtype)[..., None]
                loss = -((moved.pow(2) * mask).sum() / mask.sum())
                opt.zero_grad()
                loss.backward()
                opt.step()
                constrain(delta)
                losses.append(loss.item())
            found.append(delta.detach())
    return torch.stack(found), Trace(losses)


def diff_of_means(harmful_last: torch.Tensor, harmless_last: torch.Tensor, radius: float) -> torch.Tensor:
    """Minus the refusal direction (mean harmful - mean harmless last-token residual), scaled to `radius`."""
    direction = harmful_last.double().mean(0) - harmless_last.double().mean(0)
    return -direction / direction.norm() * radius


def random_directions(width: int, n: int, radius: float, seed: int = 0) -> torch.Tensor:
    """`n` directions uniform on the sphere of `radius` (N, D), float64."""
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, width, generator=generator, dtype=torch.float64)
    return vectors / vectors.norm(dim=-1, keepdim=True) * radius


@torch.no_grad()
def batch_scores(
    lm: LoadedModel,
    layer: int,
    batches: Sequence[Batch],
    objective: Objective,
    delta: torch.Tensor | None,
    caches: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The objective per prompt of `batches` (in row order) under `delta` ((D,) or one row per prompt);
    `caches` (one `block_input` per batch, reusable across deltas) skip the blocks below `layer`."""
    rows = [r for b in batches for r in b.rows]
    out = torch.empty(max(rows) + 1 if rows else 0, dtype=torch.float64)
    for index, batch in enumerate(batches):
        where = torch.tensor(batch.rows)
        part = delta[where] if delta is not None and delta.dim() == 2 else delta
        if part is not None:
            part = part.to(lm.device, lm.dtype)
        cache = caches[index] if caches is not None else block_input(lm, layer, batch)
        out[where] = objective(forward_logits(lm, layer, batch, part, cache), batch).double().cpu()
    return out[rows]
