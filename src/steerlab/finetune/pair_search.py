"""Searching for stronger contrast pairs: score pairs by steering effect per unit of injected norm, select a
subset of a pool greedily, edit a pair's tokens along the gradient (GCG-style), and measure effect per norm
against pair length.

A pair's vector is the difference of the residual stream after block L at the last token of its positive
and negative text; a set of pairs gives the mean of its differences (the demo's mean-difference vector).
Every vector is scored by direction only: it is rescaled to one norm r (a fraction of the residual norm) and
added at all positions but the sink, as the demo steers. The effect is the demo's: p(positive next word)
at +r minus at -r, per prompt; effect per norm divides it by r. Selection uses the validation prompts
only; the test prompts score what was selected.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from steerlab.data import PairedTexts, PromptSet, encode
from steerlab.data.batching import pad_batch
from steerlab.data.templating import adds_bos
from steerlab.errors import UserError
from steerlab.evaluate import NeutralText, bootstrap_ci, side_effects
from steerlab.evaluate.probability import WordPreference, prepare_word_preference
from steerlab.hooks import Positions, add, no_param_grads, resume_after_block, run_to_layers
from steerlab.io import load_record, read_json, save_result, write_json
from steerlab.models import LoadedModel
from steerlab.models.architectures import num_layers


@dataclass(frozen=True)
class EffectProbe:
    """Prompts prepared for scoring many directions at layer `layer` and norm `norm`: padded once, with the
    unsteered output of block `layer` recorded once (the blocks below are never run again)."""

    lm: LoadedModel
    layer: int
    norm: float
    ids: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor  # (P, T, D) output of block `layer`, unsteered
    positive_tokens: list[int]
    negative_tokens: list[int]
    positions: Positions | None = None

    @property
    def n_prompts(self) -> int:
        return self.ids.shape[0]


def _block_output(lm: LoadedModel, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    seen: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        run_to_layers(
            lm.model, [layer], lambda _, h: seen.update({0: h.detach()}), input_ids=ids, attention_mask=mask
        )
    return seen[0]


def make_probe(
    lm: LoadedModel, prepared: WordPreference, layer: int, norm: float, positions: Positions | None = None
) -> EffectProbe:
    """An `EffectProbe` over prompts prepared for the word-preference metric (`prepare_word_preference`)."""
    if not norm > 0:
        raise UserError(f"the injected norm must be positive, got {norm}")
    ids, mask = pad_batch(prepared.prompts, lm.tokenizer.pad_token_id or 0, lm.device)
    hidden = _block_output(lm, layer, ids, mask)
    return EffectProbe(
        lm,
        layer,
        float(norm),
        ids,
        mask,
        hidden,
        prepared.positive_tokens,
        prepared.negative_tokens,
        positions,
    )


def probe_for_prompts(
    lm: LoadedModel,
    prompts: PromptSet,
    words: dict[str, list[str]] | dict[str, list[int]],
    layer: int,
    norm: float,
    positions: Positions | None = None,
) -> EffectProbe:
    """`make_probe` for `prompts` and the word lists of the demo's metric (or lists of token ids)."""
    pos, neg = words["positive"], words["negative"]
    if all(isinstance(t, int) for t in [*pos, *neg]):
        prepared = WordPreference([encode(lm.tokenizer, p) for p in prompts.prompts], list(pos), list(neg))
    else:
        prepared = prepare_word_preference(lm, prompts.prompts, pos, neg)  # type: ignore[arg-type]
    return make_probe(lm, prepared, layer, norm, positions)


def probe_scores(probe: EffectProbe, deltas: torch.Tensor, max_rows: int = 512) -> torch.Tensor:
    """p(positive) (C, P) with each of the C deltas (C, D) added after block `probe.layer`, as
    `word_preference` computes it under `add` (log-softmax in float64 for a float64 model, else float32);
    differentiable in `deltas`."""
    lm, n = probe.lm, probe.n_prompts
    last = probe.mask.sum(-1) - 1
    chunk = max(1, max_rows // n)
    out = []
    for start in range(0, deltas.shape[0], chunk):
        part = deltas[start : start + chunk]
        c = part.shape[0]
        rows_last = last.repeat(c)[:, None]
        hidden = probe.hidden.repeat(c, 1, 1)
        with resume_after_block(lm.model, probe.layer, [hidden]):
            with add(lm.model, {probe.layer: part.repeat_interleave(n, 0)}, probe.positions):
                logits = lm.model(
                    input_ids=probe.ids.repeat(c, 1),
                    attention_mask=probe.mask.repeat(c, 1),
                    use_cache=False,
                    logits_to_keep=rows_last,
                ).logits
        if logits.shape[1] != 1:  # a model that ignores per-row logits_to_keep
            logits = logits.gather(1, rows_last[..., None].expand(-1, 1, logits.shape[-1]))
        logprobs = logits[:, 0].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1).double()
        pos = logprobs[:, probe.positive_tokens].logsumexp(-1)
        neg = logprobs[:, probe.negative_tokens].logsumexp(-1)
        out.append(torch.sigmoid(pos - neg).view(c, n))
    return torch.cat(out)


def effect_per_norm(probe: EffectProbe, directions: torch.Tensor) -> torch.Tensor:
    """(C, P): [p(positive) at +r·u - at -r·u] / r for each direction's unit vector u (directions (C, D))."""
    units = directions / directions.norm(dim=-1, keepdim=True)
    deltas = probe.norm * units.to(probe.hidden.dtype)
    scores = probe_scores(probe, torch.cat([deltas, -deltas]))
    c = directions.shape[0]
    return (scores[:c] - scores[c:]) / probe.norm


# --- pair activations ---


def _last_hidden(
    lm: LoadedModel, layer: int, sequences: Sequence[list[int]], batch_size: int
) -> torch.Tensor:
    """Residual after block `layer` at the last token of each sequence (N, D), no gradient."""
    out = []
    pad = lm.tokenizer.pad_token_id or 0
    for start in range(0, len(sequences), batch_size):
        group = list(sequences[start : start + batch_size])
        ids, mask = pad_batch(group, pad, lm.device)
        hidden = _block_output(lm, layer, ids, mask)
        out.append(hidden[torch.arange(len(group)), mask.sum(-1) - 1])
    return torch.cat(out)


def pair_differences(
    lm: LoadedModel,
    pairs: PairedTexts | Sequence[tuple[list[int], list[int]]],
    layer: int,
    batch_size: int = 16,
) -> torch.Tensor:
    """(N, D): positive minus negative residual after block `layer` at each text's last token; pairs are
    texts or token ids."""
    if isinstance(pairs, PairedTexts):
        pos = [encode(lm.tokenizer, t) for t in pairs.positive]
        neg = [encode(lm.tokenizer, t) for t in pairs.negative]
    else:
        pos, neg = [list(p) for p, _ in pairs], [list(n) for _, n in pairs]
    return _last_hidden(lm, layer, pos, batch_size) - _last_hidden(lm, layer, neg, batch_size)


def residual_norm(lm: LoadedModel, pairs: PairedTexts, layer: int) -> float:
    """Mean norm of the residual after block `layer` at the last token of every text of `pairs`."""
    seqs = [encode(lm.tokenizer, t) for t in [*pairs.positive, *pairs.negative]]
    return float(_last_hidden(lm, layer, seqs, 16).double().norm(dim=-1).mean())


# --- greedy selection ---


def _checkpoint(path: Path | None, key: str) -> dict | None:
    """The saved state at `path` if it was written for the same `key` (config fingerprint)."""
    if path is None or not path.is_file():
        return None
    state = read_json(path)
    return state if state.get("key") == key else None


def greedy_select(
    score: Callable[[torch.Tensor], torch.Tensor],
    differences: torch.Tensor,
    max_pairs: int,
    *,
    checkpoint: Path | None = None,
    key: str = "",
    progress: bool = False,
) -> dict:
    """Forward selection: add the pair whose inclusion gives the mean difference with the highest `score`
    (a function of (C, D) directions -> (C,)), while it improves, up to `max_pairs` pairs.

    Returns {"selected": indices in order, "scores": the score after each addition}. With `checkpoint`, the
    state is written atomically after every step and a run with the same `key` resumes from it."""
    if max_pairs < 1:
        raise UserError(f"--max-pairs must be at least 1, got {max_pairs}")
    if not len(differences):
        raise UserError("--pool: no candidate pairs to select from")
    state = _checkpoint(checkpoint, key) or {"key": key, "selected": [], "scores": [], "done": False}
    bar = tqdm(total=max_pairs, initial=len(state["selected"]), desc="greedy selection", disable=not progress)
    while not state["done"] and len(state["selected"]) < min(max_pairs, len(differences)):
        chosen = state["selected"]
        rest = [i for i in range(len(differences)) if i not in chosen]
        total = differences[chosen].sum(0) if chosen else torch.zeros_like(differences[0])
        directions = (total + differences[rest]) / (len(chosen) + 1)
        with torch.no_grad():
            scores = score(directions)
        best = int(scores.argmax())
        if state["scores"] and float(scores[best]) <= state["scores"][-1]:
            state["done"] = True
        else:
            chosen.append(rest[best])
            state["scores"].append(float(scores[best]))
            bar.update(1)
        if checkpoint is not None:
            write_json(checkpoint, state)
    bar.close()
    return {"selected": state["selected"], "scores": state["scores"]}


# --- gradient-guided token search ---


def _embed(lm: LoadedModel, onehot: torch.Tensor) -> torch.Tensor:
    """Input embeddings of (T, V) one-hot rows, as the model's own embedding layer scales them."""
    module = lm.model.get_input_embeddings()
    embeds = onehot.to(module.weight.dtype) @ module.weight
    scale = getattr(module, "embed_scale", None)
    return embeds * scale.to(embeds.dtype) if isinstance(scale, torch.Tensor) else embeds * (scale or 1.0)


def _last_hidden_soft(lm: LoadedModel, layer: int, onehot: torch.Tensor) -> torch.Tensor:
    seen: dict[int, torch.Tensor] = {}
    embeds = _embed(lm, onehot)[None]
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    run_to_layers(
        lm.model, [layer], lambda _, h: seen.update({0: h}), inputs_embeds=embeds, attention_mask=mask
    )
    return seen[0][0, -1]


def soft_effect(probe: EffectProbe, onehot_pos: torch.Tensor, onehot_neg: torch.Tensor) -> torch.Tensor:
    """Mean effect per norm over the probe's prompts of the pair given as (relaxed) one-hot rows (T, V)."""
    diff = _last_hidden_soft(probe.lm, probe.layer, onehot_pos) - _last_hidden_soft(
        probe.lm, probe.layer, onehot_neg
    )
    return effect_per_norm(probe, diff[None]).mean()


def onehot_gradient(
    probe: EffectProbe, pos_ids: list[int], neg_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Gradient of the mean effect per norm with respect to the one-hot inputs of the positive (T+, V) and
    negative (T-, V) text, and the effect itself."""
    vocab = probe.lm.model.get_input_embeddings().weight.shape[0]
    dtype = probe.hidden.dtype
    oh_pos = F.one_hot(torch.tensor(pos_ids, device=probe.lm.device), vocab).to(dtype).requires_grad_(True)
    oh_neg = F.one_hot(torch.tensor(neg_ids, device=probe.lm.device), vocab).to(dtype).requires_grad_(True)
    with no_param_grads(probe.lm.model):
        value = soft_effect(probe, oh_pos, oh_neg)
        grad_pos, grad_neg = torch.autograd.grad(value, [oh_pos, oh_neg])
    return grad_pos, grad_neg, float(value.detach())


def allowed_tokens(tokenizer, vocab: int) -> torch.Tensor:
    """(vocab,) bool: tokens a search may insert (printable ASCII, not special, not blank)."""
    printable = set(string.printable) - set("\t\n\r\x0b\x0c")
    special = set(tokenizer.all_special_ids)
    allowed = torch.zeros(vocab, dtype=torch.bool)
    size = min(vocab, len(tokenizer))
    for token in range(size):
        text = tokenizer.decode([token])
        allowed[token] = token not in special and bool(text.strip()) and set(text) <= printable
    return allowed


def decode_text(tokenizer, ids: list[int]) -> str:
    """The text of `ids` without special tokens (a BOS that `encode` adds back)."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def _round_trips(tokenizer, ids: list[int]) -> bool:
    return encode(tokenizer, decode_text(tokenizer, ids)) == ids


def gcg_search(
    probe: EffectProbe,
    start: tuple[list[int], list[int]],
    *,
    steps: int,
    top_k: int,
    candidates: int,
    seed: int = 0,
    checkpoint: Path | None = None,
    key: str = "",
    progress: bool = False,
) -> dict:
    """Greedy coordinate gradient search on one pair's tokens (both texts) to raise its validation effect
    per norm: each step takes the gradient with respect to the one-hot inputs, draws `candidates` single-token
    swaps among the `top_k` tokens of highest gradient at a random position, scores them exactly and keeps
    the best if it improves. Swaps that do not survive decode/encode are dropped, so the result is text.

    Step i draws from a generator seeded by (seed, i), so a resumed run equals an uninterrupted one; the
    state is written atomically after every step when `checkpoint` is given."""
    for value, name in ((steps, "--steps"), (top_k, "--top-k"), (candidates, "--candidates")):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    lm = probe.lm
    state = _checkpoint(checkpoint, key)
    if state is None:
        pos, neg = list(start[0]), list(start[1])
        with torch.no_grad():
            first = float(effect_per_norm(probe, pair_differences(lm, [(pos, neg)], probe.layer)).mean())
        state = {
            "key": key,
            "step": 0,
            "positive_ids": pos,
            "negative_ids": neg,
            "scores": [first],
            "swaps": [],
        }
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    allowed = allowed_tokens(lm.tokenizer, vocab).to(lm.device)
    first_fixed = adds_bos(lm.tokenizer)  # never edit the BOS
    bar = tqdm(total=steps, initial=state["step"], desc="token search", disable=not progress)
    while state["step"] < steps:
        pos, neg = state["positive_ids"], state["negative_ids"]
        grad_pos, grad_neg, _ = onehot_gradient(probe, pos, neg)
        grads = torch.cat([grad_pos, grad_neg]).masked_fill(~allowed, -torch.inf)
        top = grads.topk(top_k, dim=-1).indices.cpu()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + state["step"])
        editable = [i for i in range(len(pos) + len(neg)) if not (first_fixed and i in (0, len(pos)))]
        if not editable:
            raise UserError("the pair to edit has no token but the BOS")
        where = [editable[i] for i in torch.randint(len(editable), (candidates,), generator=generator)]
        which = torch.randint(top_k, (candidates,), generator=generator).tolist()
        trials, described = [], []
        for w, k in zip(where, which):
            new_pos, new_neg = list(pos), list(neg)
            side, index = (new_pos, w) if w < len(pos) else (new_neg, w - len(pos))
            token = int(top[w, k])
            if side[index] == token:
                continue
            side[index] = token
            if (new_pos, new_neg) in trials or not (
                _round_trips(lm.tokenizer, new_pos) and _round_trips(lm.tokenizer, new_neg)
            ):
                continue
            trials.append((new_pos, new_neg))
            described.append(
                {"side": "positive" if w < len(pos) else "negative", "index": index, "token": token}
            )
        record = {"candidates": len(trials), "accepted": None}
        if trials:
            with torch.no_grad():
                scores = effect_per_norm(probe, pair_differences(lm, trials, probe.layer)).mean(1)
            best = int(scores.argmax())
            if float(scores[best]) > state["scores"][-1]:
                state["positive_ids"], state["negative_ids"] = trials[best]
                state["scores"].append(float(scores[best]))
                record["accepted"] = described[best]
            else:
                state["scores"].append(state["scores"][-1])
        else:
            state["scores"].append(state["scores"][-1])
        state["swaps"].append(record)
        state["step"] += 1
        bar.update(1)
        if checkpoint is not None:
            write_json(checkpoint, state)
    bar.close()
    return {k: v for k, v in state.items() if k != "key"}


# --- statistics ---


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of a - b over items and its percentile bootstrap 95% CI (items resampled together)."""
    return bootstrap_ci(np.asarray(a) - np.asarray(b), n_boot=n_boot, seed=seed)


def two_way_bootstrap(matrix: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a (pairs, prompts) matrix and a 95% CI resampling pairs and prompts independently."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n, p = matrix.shape
    means = np.empty(n_boot)
    for b in range(n_boot):
        rows, cols = rng.integers(0, n, n), rng.integers(0, p, p)
        means[b] = matrix[np.ix_(rows, cols)].mean()
    low, high = np.quantile(means, [0.025, 0.975])
    return float(matrix.mean()), float(low), float(high)


# --- the result ---


@dataclass
class PairSearchResult:
    """Unit directions (handwritten, greedy, gcg, searched, ...) at `layer` and everything measured."""

    directions: dict[str, torch.Tensor]
    layer: int
    norm: float
    config: dict
    pool: list[dict] = field(default_factory=list)
    greedy: dict = field(default_factory=dict)
    gcg: dict = field(default_factory=dict)
    candidates: list[dict] = field(default_factory=list)
    test: dict = field(default_factory=dict)
    lengths: list[dict] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        meta = {
            k: getattr(self, k)
            for k in ("layer", "norm", "config", "pool", "greedy", "gcg", "candidates", "test", "lengths")
        }
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.directions.items()}
        return save_result(path, tensors, meta, kind="PairSearchResult")

    @classmethod
    def load(cls, path: str | Path) -> PairSearchResult:
        return load_record(cls, path, "PairSearchResult", tensors="directions")


def config_key(config: dict) -> str:
    """Fingerprint of a search's settings: a checkpoint resumes only the same search."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_layer(lm: LoadedModel, layer: int) -> None:
    n = num_layers(lm.model)
    if not 0 <= layer < n - 1:
        raise UserError(f"--layer {layer} is out of range: steering after block L needs 0 <= L < {n - 1}")


def vector_side_effects(probe: EffectProbe, direction: torch.Tensor, neutral: NeutralText) -> dict:
    """Perplexity and KL on neutral text with r·u added after block `probe.layer` (u: the unit direction)."""
    delta = probe.norm * direction / direction.norm()
    with torch.no_grad(), add(probe.lm.model, {probe.layer: delta.to(probe.hidden.dtype)}, probe.positions):
        effects = side_effects(probe.lm, neutral)
    return {"perplexity": effects.perplexity, "kl": effects.kl}


# --- the whole search ---


@dataclass(frozen=True)
class SearchConfig:
    """The search's settings (the data are passed separately)."""

    layer: int = 20
    fraction: float = 0.1
    max_pairs: int = 8
    steps: int = 8
    top_k: int = 16
    candidates: int = 24
    seed: int = 0

    def check(self) -> None:
        for value, name in (
            (self.max_pairs, "--max-pairs"),
            (self.steps, "--steps"),
            (self.top_k, "--top-k"),
            (self.candidates, "--candidates"),
        ):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if not 0 < self.fraction:
            raise UserError(f"--fraction must be positive, got {self.fraction}")


def _scored(probe: EffectProbe, direction: torch.Tensor, seed: int) -> tuple[np.ndarray, dict]:
    with torch.no_grad():
        per_prompt = effect_per_norm(probe, direction[None])[0].double().cpu().numpy()
    mean, low, high = bootstrap_ci(per_prompt, seed=seed)
    return per_prompt, {"effect_per_norm": mean, "ci_low": low, "ci_high": high, "effect": mean * probe.norm}


def run_search(
    lm: LoadedModel,
    handwritten: PairedTexts,
    pool: PairedTexts,
    prompts_val: PromptSet,
    prompts_test: PromptSet,
    words: dict[str, list[str]] | dict[str, list[int]],
    config: SearchConfig,
    *,
    neutral: NeutralText | None = None,
    lengths: dict[int, PairedTexts] | None = None,
    checkpoints: Path | None = None,
    positions: Positions | None = None,
    progress: bool = True,
) -> PairSearchResult:
    """Pool scores, greedy subset, token search, the test comparison with the hand-written pairs' vector at
    the same norm, and effect per norm against pair length (test prompts; nothing is chosen there)."""
    config.check()
    if not len(pool):
        raise UserError("--pool: no candidate pairs to search")
    check_layer(lm, config.layer)
    key = config_key({**vars(config), "pool": pool.fingerprint, "pairs": handwritten.fingerprint,
                      "prompts": prompts_val.fingerprint, "model": lm.info.name})  # fmt: skip
    layer, seed = config.layer, config.seed
    norm = config.fraction * residual_norm(lm, handwritten, layer)
    val = probe_for_prompts(lm, prompts_val, words, layer, norm, positions)
    test = probe_for_prompts(lm, prompts_test, words, layer, norm, positions)
    hand = pair_differences(lm, handwritten, layer).mean(0)

    pool_diffs = pair_differences(lm, pool, layer)
    with torch.no_grad():
        pool_scores = effect_per_norm(val, pool_diffs).mean(1).tolist()
    pool_rows = [
        {"index": i, "positive": p, "negative": n, "validation_effect_per_norm": s}
        for i, ((p, n), s) in enumerate(zip(pool, pool_scores))
    ]

    def score(directions: torch.Tensor) -> torch.Tensor:
        return effect_per_norm(val, directions).mean(1)

    greedy = greedy_select(
        score, pool_diffs, config.max_pairs, key=key, progress=progress,
        checkpoint=None if checkpoints is None else checkpoints / "greedy.json",
    )  # fmt: skip
    greedy["pairs"] = [list(pool[i]) for i in greedy["selected"]]
    best_single = int(np.argmax(pool_scores))
    start = (
        encode(lm.tokenizer, pool.positive[best_single]),
        encode(lm.tokenizer, pool.negative[best_single]),
    )
    gcg = gcg_search(
        val, start, steps=config.steps, top_k=config.top_k, candidates=config.candidates, seed=seed,
        key=key, progress=progress, checkpoint=None if checkpoints is None else checkpoints / "gcg.json",
    )  # fmt: skip
    gcg["start_index"] = best_single
    gcg["start"] = list(pool[best_single])
    gcg["positive"], gcg["negative"] = (
        decode_text(lm.tokenizer, gcg["positive_ids"]),
        decode_text(lm.tokenizer, gcg["negative_ids"]),
    )
    gcg_diff = pair_differences(lm, [(gcg["positive_ids"], gcg["negative_ids"])], layer)[0]
    greedy_diff = pool_diffs[greedy["selected"]].mean(0)
    with_gcg = torch.cat([pool_diffs[greedy["selected"]], gcg_diff[None]]).mean(0)

    directions = {
        "handwritten": hand,
        "greedy": greedy_diff,
        "gcg": gcg_diff,
        "greedy+gcg": with_gcg,
        "best-pool-pair": pool_diffs[best_single],
    }
    generator = torch.Generator().manual_seed(seed)
    directions["random"] = torch.randn(hand.shape, generator=generator, dtype=torch.float64).to(hand)
    searched = ["greedy", "gcg", "greedy+gcg", "best-pool-pair"]
    with torch.no_grad():
        val_scores = score(torch.stack([directions[k] for k in searched])).tolist()
    chosen = searched[int(np.argmax(val_scores))]
    directions["searched"] = directions[chosen]

    per_prompt, candidates = {}, []
    for name, direction in directions.items():
        if name == "searched":
            continue
        per_prompt[name], row = _scored(test, direction, seed)
        with torch.no_grad():
            row = {"vector": name, "validation_effect_per_norm": float(score(direction[None])[0]), **row}
        row["cos_with_handwritten"] = float(F.cosine_similarity(direction, hand, dim=0))
        if neutral is not None:
            row.update(vector_side_effects(test, direction, neutral))
        candidates.append(row)
    diff, low, high = paired_bootstrap(per_prompt[chosen], per_prompt["handwritten"], seed=seed)
    test_summary = {
        "searched": chosen,
        "effect_per_norm_handwritten": float(per_prompt["handwritten"].mean()),
        "effect_per_norm_searched": float(per_prompt[chosen].mean()),
        "difference": diff,
        "ci_low_difference": low,
        "ci_high_difference": high,
        "norm": norm,
        "n_prompts_test": test.n_prompts,
        "n_prompts_validation": val.n_prompts,
    }
    if neutral is not None:
        with torch.no_grad():
            test_summary["perplexity_unsteered"] = side_effects(lm, neutral).perplexity
    length_rows = length_strength(lm, test, lengths, seed, progress) if lengths else []
    directions = {k: v / v.norm() for k, v in directions.items()}
    return PairSearchResult(
        directions, layer, norm, {**vars(config), "key": key}, pool_rows, greedy, gcg, candidates,
        test_summary, length_rows,
    )  # fmt: skip


def length_strength(
    lm: LoadedModel,
    probe: EffectProbe,
    lengths: dict[int, PairedTexts],
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Per nominal length: the mean effect per norm of its pairs' single-pair vectors (95% CI resampling
    pairs and prompts), that of the mean vector of its pairs (CI over prompts), and the measured length."""
    rows = []
    for length, pairs in tqdm(lengths.items(), desc="length vs strength", disable=not progress):
        diffs = pair_differences(lm, pairs, probe.layer)
        with torch.no_grad():
            matrix = effect_per_norm(probe, diffs).double().cpu().numpy()
            mean_vector = effect_per_norm(probe, diffs.mean(0)[None])[0].double().cpu().numpy()
        mean, low, high = two_way_bootstrap(matrix, seed=seed)
        vmean, vlow, vhigh = bootstrap_ci(mean_vector, seed=seed)
        tokens = [len(encode(lm.tokenizer, t)) for t in [*pairs.positive, *pairs.negative]]
        rows.append({
            "length": length, "measured_tokens": float(np.mean(tokens)), "n_pairs": len(pairs),
            "effect_per_norm": mean, "ci_low": low, "ci_high": high,
            "per_pair": matrix.mean(1).tolist(),
            "mean_vector_effect_per_norm": vmean, "mean_vector_ci_low": vlow, "mean_vector_ci_high": vhigh,
        })  # fmt: skip
    return rows
