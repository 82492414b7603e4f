"""Running the attacks over layers x budgets x methods into a resumable run folder.

Universal vectors (optimised, MELBO) are trained on the harmful *train* prompts only and judged on the
harmful *test* prompts; the per-prompt attack is optimised on each test prompt itself (the adversarial
upper bound). A judge decides refusal: "score" (the first-token refusal score > 0, no generation), or
"phrases" / a judge model on greedy replies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from steerlab.data import format_prompt
from steerlab.errors import UserError
from steerlab.evaluate import generate, prepare_neutral, side_effects
from steerlab.evaluate.side_effects import NeutralText
from steerlab.hooks import add
from steerlab.io import read_json, write_json
from steerlab.models import LoadedModel, num_layers
from steerlab.redteam import attacks as A
from steerlab.redteam.result import Cell, RedteamResult, cell_done, cell_name

log = logging.getLogger(__name__)

Judge = Callable[[Sequence[str], Sequence[str]], list[bool]]


@dataclass
class Prompts:
    """The four prompt lists of a run (harmless test prompts measure side effects)."""

    harmful_train: list[str]
    harmful_test: list[str]
    harmless_train: list[str]
    harmless_test: list[str]


def generate_perturbed(
    lm: LoadedModel,
    prompts: Sequence[str],
    layer: int,
    delta: torch.Tensor | None,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy replies with `delta` ((D,), or one row per prompt (N, D)) added after block `layer` at
    every prompt position but the sink and at every generated token."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        part = delta[start : start + len(chunk)] if delta is not None and delta.dim() == 2 else delta
        if part is None:
            out.extend(generate(lm, chunk, max_new_tokens=max_new_tokens, batch_size=len(chunk)))
            continue
        with add(lm.model, {layer: part.to(lm.device, lm.dtype)}, A.POSITIONS):
            out.extend(generate(lm, chunk, max_new_tokens=max_new_tokens, batch_size=len(chunk)))
    return out


class Runner:
    """Everything a run needs once: batches, objectives, the judge, the harmless reference."""

    def __init__(self, lm: LoadedModel, args: Any, prompts: Prompts, judge: Judge | None, folder: Path):
        self.lm, self.args, self.prompts, self.judge, self.folder = lm, args, prompts, judge, folder
        bs = args.batch_size
        self.objective = A.refusal_objective(lm, args.objective)
        self.score = A.refusal_objective(lm, "refusal")
        target = args.target if args.objective == "target" else None
        self.train_target = A.make_batches(lm, prompts.harmful_train, target, bs)
        self.train = A.make_batches(lm, prompts.harmful_train, None, bs)
        self.harmless = A.make_batches(lm, prompts.harmless_train, None, bs)
        self.test = A.make_batches(lm, prompts.harmful_test, None, bs)
        self.test_target = A.make_batches(lm, prompts.harmful_test, target, bs)
        self.neutral: NeutralText | None = None
        self._caches: dict[tuple[str, int], list[torch.Tensor]] = {}

    def caches(self, which: str, layer: int) -> list[torch.Tensor]:
        """Block inputs at `layer` of the test or train batches, computed once per layer."""
        key = (which, layer)
        if key not in self._caches:
            self._caches = {k: v for k, v in self._caches.items() if k[1] == layer}
            batches = self.test if which == "test" else self.train
            self._caches[key] = [A.block_input(self.lm, layer, b) for b in batches]
        return self._caches[key]

    # -- judging -------------------------------------------------------------------------------
    def refused(
        self, layer: int, delta: torch.Tensor | None, n: int | None = None
    ) -> tuple[list[bool], list[str]]:
        """(refused per test prompt, replies) for the first `n` test prompts (all by default)."""
        prompts = self.prompts.harmful_test[: n or None]
        if self.judge is None:  # the first-token refusal score
            needed = [i for i, b in enumerate(self.test) if b.rows[0] < len(prompts)]
            caches = self.caches("test", layer)
            scores = A.batch_scores(
                self.lm, layer, [self.test[i] for i in needed], self.score, delta, [caches[i] for i in needed]
            )[: len(prompts)]
            shown = self.args.show
            part = delta[:shown] if delta is not None and delta.dim() == 2 else delta
            replies = generate_perturbed(self.lm, prompts[:shown], layer, part, self.args.max_new_tokens)
            return [bool(s > 0) for s in scores], replies
        part = delta[: len(prompts)] if delta is not None and delta.dim() == 2 else delta
        replies = generate_perturbed(self.lm, prompts, layer, part, self.args.max_new_tokens)
        return list(self.judge(prompts, replies)), replies

    def side_effects(self, layer: int, delta: torch.Tensor) -> tuple[float, float]:
        assert self.neutral is not None
        with add(self.lm.model, {layer: delta.to(self.lm.device, self.lm.dtype)}, A.POSITIONS):
            effects = side_effects(self.lm, self.neutral, batch_size=self.args.batch_size)
        return effects.kl, effects.perplexity

    # -- baseline ------------------------------------------------------------------------------
    def baseline(self) -> dict[str, Any]:
        """Unperturbed refusals on the harmful test prompts, replies to the harmless ones, and the
        harmless reference for KL / perplexity (computed once, kept in base.json)."""
        path = self.folder / "base.json"
        if path.is_file():
            base = read_json(path)
        else:
            t0 = time.perf_counter()
            refused, replies = self.refused(0, None)
            harmless = generate_perturbed(
                self.lm, self.prompts.harmless_test, 0, None, self.args.max_new_tokens
            )
            from steerlab.evaluate.judges import is_refusal

            base = {
                "refused": refused,
                "generations": replies,
                "harmless_generations": harmless,
                "harmless_refused": [is_refusal(g) for g in harmless],
            }
            self.neutral = self._neutral(harmless)
            effects = side_effects(self.lm, self.neutral, batch_size=self.args.batch_size)
            base.update(ppl=effects.perplexity, seconds=time.perf_counter() - t0)
            write_json(path, base)
        self.neutral = self.neutral or self._neutral(base["harmless_generations"])
        return base

    def _neutral(self, replies: Sequence[str]) -> NeutralText:
        texts = [
            format_prompt(self.lm.tokenizer, p) + r
            for p, r in zip(self.prompts.harmless_test, replies, strict=True)
        ]
        return prepare_neutral(self.lm, texts, batch_size=self.args.batch_size)

    # -- one cell ------------------------------------------------------------------------------
    def cell(self, method: str, layer: int, eps: float, radius: float, stats, warm) -> Cell:
        args = self.args
        t0 = time.perf_counter()
        losses: list[float] = []
        extra: dict[str, Any] = {}
        if method == "optimised":
            delta, trace = A.universal_attack(
                self.lm, layer, self.train_target, self.objective, radius, args.steps, args.lr, init=warm
            )
            deltas, losses = delta[None], trace.losses
        elif method == "diff-of-means":
            deltas = A.diff_of_means(stats[1], stats[2], radius)[None]
        elif method == "per-prompt":
            deltas, trace = A.per_prompt_attack(
                self.lm, layer, self.test_target, self.objective, radius, args.per_prompt_steps, args.lr
            )
            losses = trace.losses
        elif method == "melbo":
            target = min(layer + args.melbo_offset, num_layers(self.lm.model) - 1)
            vectors, trace = A.melbo_attack(
                self.lm,
                layer,
                target,
                self.train,
                radius,
                args.melbo_vectors,
                args.melbo_steps,
                args.lr,
                args.seed,
            )
            caches = self.caches("train", layer)
            train_scores = [
                float(A.batch_scores(self.lm, layer, self.train, self.score, v, caches).mean())
                for v in vectors
            ]
            best = min(range(len(vectors)), key=train_scores.__getitem__)
            extra = {"target_layer": target, "train_refusal_scores": train_scores, "selected": best}
            deltas, losses = vectors[best][None], trace.losses
        elif method == "random":
            deltas = A.random_directions(stats[1].shape[-1], args.n_random, radius, seed=args.seed + layer)
        else:
            raise UserError(f"--methods: unknown method {method!r}")
        deltas = deltas.to(torch.float64) if deltas.dtype != torch.float64 else deltas
        if method == "per-prompt":
            flags, replies = self.refused(layer, deltas)
            refused, generations, kl, ppl = [flags], [replies], None, None
        else:
            n = args.random_prompts if method == "random" else None
            refused, generations, kls, ppls = [], [], [], []
            for v, delta in enumerate(deltas):
                flags, replies = self.refused(layer, delta, n)
                refused.append(flags)
                if v == 0:
                    generations.append(replies)
                if v < args.kl_vectors:
                    kl, ppl = self.side_effects(layer, delta)
                    kls.append(kl)
                    ppls.append(ppl)
            kl, ppl = sum(kls) / len(kls), sum(ppls) / len(ppls)
        return Cell(
            method,
            layer,
            eps,
            radius,
            torch.tensor(refused, dtype=torch.bool),
            deltas.float(),
            generations,
            kl,
            ppl,
            losses,
            time.perf_counter() - t0,
            extra,
        )


def check_config(folder: Path, config: dict[str, Any]) -> None:
    """Write the run's settings, or check that the folder's run used the same ones (resume)."""
    path = folder / "config.json"
    if path.is_file():
        old = read_json(path)
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if changed:
            raise UserError(
                f"--out {folder}: holds a run with other settings ({', '.join(changed)}); "
                "use another folder or the same settings to resume"
            )
    else:
        write_json(path, config)


def run_attacks(
    lm: LoadedModel,
    args: Any,
    prompts: Prompts,
    judge: Judge | None,
    folder: Path,
    config: dict[str, Any],
    progress: bool = False,
) -> RedteamResult:
    """Every (method, layer, eps) cell not already in `folder`, each saved as soon as it is done."""
    folder.mkdir(parents=True, exist_ok=True)
    check_config(folder, config)
    runner = Runner(lm, args, prompts, judge, folder)
    runner.baseline()
    jobs = [(layer, eps) for layer in args.layers for eps in sorted(args.eps)]
    bar = tqdm(total=len(jobs) * len(args.methods), desc="red-teaming cells", disable=not progress)
    stats_by_layer: dict[int, tuple] = {}
    warm: dict[int, torch.Tensor] = {}
    for layer, eps in jobs:
        for method in args.methods:
            if cell_done(folder, method, layer, eps):
                if method == "optimised":
                    warm[layer] = Cell.load(folder / "cells" / cell_name(method, layer, eps)).deltas[0]
                bar.update()
                continue
            if layer not in stats_by_layer:
                norm, harmful_last = A.residual_stats(lm, layer, runner.train)
                _, harmless_last = A.residual_stats(lm, layer, runner.harmless)
                stats_by_layer[layer] = (norm, harmful_last, harmless_last)
            stats = stats_by_layer[layer]
            radius = eps * stats[0]
            log.info("cell %s (radius %.3g)", cell_name(method, layer, eps), radius)
            cell = runner.cell(method, layer, eps, radius, stats, warm.get(layer))
            cell.extra["residual_norm"] = stats[0]
            cell.save(folder)
            if method == "optimised":
                warm[layer] = cell.deltas[0]
            bar.update()
    bar.close()
    return RedteamResult.load(folder)
