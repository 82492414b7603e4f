"""Grids over layers x strengths x dimension subsets, with controls and side effects, as tidy rows (one
CSV line each).

Strengths are given as signed *fractions of the residual norm* (fraction f at layer L adds a vector of
norm |f| x the mean residual norm at L, so grids mean the same thing at every layer and on every model)
or as raw multipliers m (adds m x v). A grid may also restrict the vector to a fraction of the residual
dimensions (`steering.dimensions`); the random control gets the same restriction at the same norm.

Every setting at layer L shares the unsteered computation up to block L: `sweep` runs it once (in the
baseline pass, which records the output of each swept layer for every forward call the metric and the
side-effect measure make) and each setting then runs only the blocks above L and the head, from the
recorded output with the steering vector added (`hooks.resume_after_block`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steerlab.errors import UserError
from steerlab.evaluate import NeutralText, side_effects
from steerlab.hooks import Positions, as_module, read_residual, resume_after_block
from steerlab.io import atomic_write_text
from steerlab.models import LoadedModel
from steerlab.models.architectures import resolve_layer
from steerlab.steering.dimensions import check_fraction, check_selection, restrict, with_norms_of
from steerlab.steering.metrics import Metric, summarise
from steerlab.steering.vector import SteeringVector

COLUMNS = [
    "split",
    "vector",
    "dims",
    "dim_fraction",
    "layer",
    "fraction",
    "multiplier",
    "added_norm",
    "score",
    "score_ci_low",
    "score_ci_high",
    "p_first",
    "chance",
    "perplexity",
    "kl",
    "n_items",
]


FULL = ("all", 1.0)
"""The dimension option of the whole vector."""


@dataclass(frozen=True)
class Grid:
    """Layers x strengths (signed fractions of the residual norm, or instead raw multipliers) x, optionally,
    dimension subsets: each selection of `dims` ("first", "random", "top") at each of `dim_fractions`."""

    layers: Sequence[int]
    fractions: Sequence[float] = ()
    multipliers: Sequence[float] = ()
    dims: Sequence[str] = ()
    dim_fractions: Sequence[float] = ()

    def __post_init__(self) -> None:
        if bool(self.fractions) == bool(self.multipliers):
            raise UserError("a sweep grid takes either fractions or multipliers (exactly one of them)")
        if not self.layers:
            raise UserError("a sweep grid needs at least one layer")
        if bool(self.dims) != bool(self.dim_fractions):
            raise UserError(
                "--dims and --dim-fractions: a dimension grid needs both (selections and fractions)"
            )
        for name in self.dims:
            check_selection(name, "--dims")
        for fraction in self.dim_fractions:
            check_fraction(fraction, "--dim-fractions")

    def dimension_options(self) -> list[tuple[str, float]]:
        """(selection, fraction of the dimensions): the whole vector ("all", 1.0) when no dimension grid is
        given or a fraction is 1, then every selection at every smaller fraction."""
        if not self.dims:
            return [FULL]
        names = list(dict.fromkeys(check_selection(name) for name in self.dims))
        fractions = list(dict.fromkeys(float(f) for f in self.dim_fractions))
        options = [FULL] if 1.0 in fractions else []
        return options + [(name, f) for name in names for f in fractions if f < 1.0]

    def settings(self, vector: SteeringVector) -> list[tuple[int, float | None, float]]:
        """(layer, fraction, multiplier) for every non-zero strength; the fraction is None where the vector
        has no residual norm to relate a raw multiplier to."""
        out = []
        for layer in self.layers:
            if self.fractions:
                out += [
                    (layer, f, vector.multiplier_for_fraction(layer, f)) for f in self.fractions if f != 0
                ]
                continue
            out += [(layer, vector.signed_fraction(layer, m), m) for m in self.multipliers if m != 0]
        return out


def _row(
    split: str,
    kind: str,
    dims: tuple[str, float] | None,
    layer: int,
    fraction: float | None,
    multiplier: float,
    added: float,
    scores,
    effects,
) -> dict:
    summary = summarise(scores)
    return {
        "split": split,
        "vector": kind,
        "dims": dims[0] if dims else None,
        "dim_fraction": dims[1] if dims else None,
        "layer": layer,
        "fraction": fraction,
        "multiplier": multiplier,
        "added_norm": added,
        "score": summary["score"],
        "score_ci_low": summary["ci"][0],
        "score_ci_high": summary["ci"][1],
        "p_first": summary.get("p_first"),
        "chance": summary.get("chance"),
        "perplexity": effects.perplexity if effects else None,
        "kl": effects.kl if effects else None,
        "n_items": summary["n_items"],
        "item_scores": scores["score"].double().cpu(),  # per item, for paired statistics; not in the CSV
    }


def _same(x, y) -> bool:
    """Whether two forward-call arguments are equal (tensors element by element)."""
    if isinstance(x, tuple | list):
        return isinstance(y, tuple | list) and len(x) == len(y) and all(_same(i, j) for i, j in zip(x, y))
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
    return x == y


class PrefixCache:
    """The output of each of `layers` for every forward call one unsteered measurement makes.

    `recording()` yields a model whose calls run normally and are recorded; inside `resume(layer)`, the
    k-th call of the model it yields skips blocks 0..`layer` and takes the k-th recorded output of block
    `layer` (`hooks.resume_after_block`), which steering entered *inside* that context edits as it would
    the block's own output. Both models stand in for `lm` in a metric (calls through `lm.model(...)`); a
    replayed call must repeat the recorded one (same arguments, same order), or a RuntimeError is raised.
    """

    def __init__(self, lm: LoadedModel, layers: Sequence[int]):
        self.lm = lm
        self.layers = list(dict.fromkeys(layers))
        self.calls: list[tuple[tuple, dict]] = []  # the (args, kwargs) of each recorded forward call
        self.outputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def recording(self) -> LoadedModel:
        return replace(self.lm, model=_Forward(self, replay=False))

    @contextmanager
    def resume(self, layer: int) -> Iterator[LoadedModel]:
        forward = _Forward(self, replay=True)
        with resume_after_block(self.lm.model, layer, self.outputs[layer]):
            yield replace(self.lm, model=forward)
        if forward.count != len(self.calls):
            raise RuntimeError(
                f"the metric made {forward.count} forward calls where the unsteered pass made {len(self.calls)}"
            )


class _Forward:
    """Stands in for `lm.model`: forwards attributes to it; calls are recorded or checked against the
    recorded ones."""

    def __init__(self, cache: PrefixCache, replay: bool):
        self._cache, self._replay, self.count = cache, replay, 0

    def __getattr__(self, name: str):
        return getattr(self._cache.lm.model, name)

    def __call__(self, *args, **kwargs):
        model, cache = self._cache.lm.model, self._cache
        index, self.count = self.count, self.count + 1
        if self._replay:
            if index >= len(cache.calls) or not _same(cache.calls[index], (args, kwargs)):
                raise RuntimeError(
                    "the metric's forward calls differ from the unsteered ones recorded for the sweep "
                    "(a metric must make the same calls every time; pass reuse_prefix=False otherwise)"
                )
            return model(*args, **kwargs)
        seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in cache.layers}
        with read_residual(model, cache.layers, lambda layer, hidden: seen[layer].append(hidden.detach())):
            out = model(*args, **kwargs)
        if any(len(outputs) != 1 for outputs in seen.values()):
            raise RuntimeError("a recorded forward call did not run every swept layer once")
        cache.calls.append((args, kwargs))
        for layer, outputs in seen.items():
            cache.outputs[layer].append(outputs[0])
        return out


def _variants(
    vector: SteeringVector, grid: Grid, controls: bool, seed: int
) -> list[tuple[tuple[str, float], dict[str, SteeringVector]]]:
    """Per dimension option: the (restricted) steering vector and the random control restricted to the
    same dimensions at the same norm."""
    random = vector.random_like(seed=seed) if controls else None
    out = []
    for option in grid.dimension_options():
        if option == FULL:
            kinds = {"steering": vector}
            if random is not None:
                kinds["random"] = random
        else:
            selection, fraction = option
            steering = restrict(vector, selection, fraction, seed=seed)
            kinds = {"steering": steering}
            if random is not None:
                control = restrict(random, selection, fraction, seed=seed, reference=vector)
                kinds["random"] = with_norms_of(control, steering)
        out.append((option, kinds))
    return out


def sweep(
    lm: LoadedModel,
    vector: SteeringVector,
    metric: Metric,
    grid: Grid,
    *,
    split: str = "validation",
    positions: Positions | None = None,
    neutral: NeutralText | None = None,
    controls: bool = True,
    seed: int = 0,
    progress: bool = True,
    reuse_prefix: bool = True,
) -> list[dict]:
    """Score every (layer, dimension option, strength) with the steering vector and, if `controls`, a
    same-norm random one restricted to the same dimensions (`seed` draws it and the "random" dimensions).

    The unsteered baseline is measured once and appears as rows with vector="none" and fraction 0 at
    every layer. With `reuse_prefix` (the default) that pass also records the residual stream at every
    swept layer, and each setting runs only the blocks above its layer; the results are those of running
    every setting from scratch (`reuse_prefix=False`), which needs memory for the recorded residuals:
    (tokens the metric and the neutral text feed) x width x swept layers.
    """
    variants = _variants(vector, grid, controls, seed)
    jobs = [
        (layer, option, kind, fraction, multiplier)
        for option, kinds in variants
        for layer, fraction, multiplier in grid.settings(kinds["steering"])
        for kind in kinds
    ]
    vectors = dict(variants)
    module = as_module(lm)

    def measure(model: LoadedModel):
        return metric(model), side_effects(model, neutral) if neutral is not None else None

    cache = PrefixCache(lm, [resolve_layer(module, layer) for layer in grid.layers])
    with torch.no_grad():
        base_scores, base_effects = measure(cache.recording() if reuse_prefix else lm)
    rows = [
        _row(split, "none", None, layer, 0.0, 0.0, 0.0, base_scores, base_effects) for layer in grid.layers
    ]
    for layer, option, kind, fraction, multiplier in tqdm(
        jobs, desc=f"sweep ({split})", disable=not progress, unit="setting"
    ):
        chosen = vectors[option][kind]
        with ExitStack() as stack:  # resume first: the steering hook goes on what stands in for the block
            runner = stack.enter_context(cache.resume(resolve_layer(module, layer))) if reuse_prefix else lm
            stack.enter_context(torch.no_grad())
            stack.enter_context(chosen.apply(lm, layer=layer, multiplier=multiplier, positions=positions))
            scores, effects = measure(runner)
        added = abs(multiplier) * chosen.norm(layer)
        rows.append(_row(split, kind, option, layer, fraction, multiplier, added, scores, effects))
    return rows


@dataclass(frozen=True)
class Choice:
    layer: int
    fraction: float
    effect: float  # score(+f) - score(-f) on the split it was chosen on
    dims: str = FULL[0]
    dim_fraction: float = FULL[1]


def choose_setting(rows: Sequence[dict], max_perplexity_increase: float = 0.2) -> Choice:
    """The (layer, dimension option, fraction > 0) with the largest score(+f) - score(-f) among settings
    whose perplexity rises by at most `max_perplexity_increase` at both signs; ties go to the earlier layer,
    then the whole vector and larger dimension fractions, then the smaller fraction."""
    base = {r["layer"]: r for r in rows if r["vector"] == "none"}
    steer_rows = {
        (r["layer"], r.get("dims") or FULL[0], r.get("dim_fraction") or FULL[1], r["fraction"]): r
        for r in rows
        if r["vector"] == "steering"
    }
    best: Choice | None = None
    order = sorted(steer_rows, key=lambda k: (k[0], k[1] != FULL[0], -k[2], k[1], k[3]))
    for layer, dims, dim_fraction, fraction in order:
        plus, minus = (
            steer_rows[layer, dims, dim_fraction, fraction],
            steer_rows.get((layer, dims, dim_fraction, -fraction)),
        )
        if fraction <= 0 or minus is None:
            continue
        ppl0 = base[layer]["perplexity"]
        if (
            ppl0 is not None
            and max(plus["perplexity"], minus["perplexity"]) > (1 + max_perplexity_increase) * ppl0
        ):
            continue
        effect = plus["score"] - minus["score"]
        if best is None or effect > best.effect + 1e-9:
            best = Choice(layer, fraction, effect, dims, dim_fraction)
    if best is None:
        raise ValueError("no setting in the grid keeps the perplexity increase within bounds")
    return best


def rows_to_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    return buffer.getvalue()


def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    atomic_write_text(path, rows_to_csv(rows))
