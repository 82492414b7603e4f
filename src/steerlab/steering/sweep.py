"""Grids over layers x multipliers with controls and side effects, as tidy rows (one CSV line each).

Strengths are given as signed *fractions of the residual norm* (fraction f at layer L adds a vector of
norm |f| x the mean residual norm at L, so grids mean the same thing at every layer and on every model)
or as raw multipliers m (adds m x v).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steerlab.errors import UserError
from steerlab.evaluate import NeutralText, side_effects
from steerlab.hooks import Positions
from steerlab.io import atomic_write_text
from steerlab.models import LoadedModel
from steerlab.steering.metrics import Metric, summarise
from steerlab.steering.vector import SteeringVector

COLUMNS = [
    "split",
    "vector",
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


@dataclass(frozen=True)
class Grid:
    """Layers x strengths: signed fractions of the residual norm, or (instead) raw multipliers."""

    layers: Sequence[int]
    fractions: Sequence[float] = ()
    multipliers: Sequence[float] = ()

    def __post_init__(self) -> None:
        if bool(self.fractions) == bool(self.multipliers):
            raise UserError("a sweep grid takes either fractions or multipliers (exactly one of them)")
        if not self.layers:
            raise UserError("a sweep grid needs at least one layer")

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
) -> list[dict]:
    """Score every (layer, strength) with the steering vector and, if `controls`, a same-norm random one.

    The unsteered baseline appears once, as rows with vector="none" and fraction 0 at every layer.
    """
    settings = grid.settings(vector)
    with torch.no_grad():
        base_scores = metric(lm)
        base_effects = side_effects(lm, neutral) if neutral is not None else None
    kinds = {"steering": vector}
    if controls:
        kinds["random"] = vector.random_like(seed=seed)
    jobs = [(kind, *setting) for setting in settings for kind in kinds]
    rows = [_row(split, "none", layer, 0.0, 0.0, 0.0, base_scores, base_effects) for layer in grid.layers]
    for kind, layer, fraction, multiplier in tqdm(
        jobs, desc=f"sweep ({split})", disable=not progress, unit="setting"
    ):
        chosen = kinds[kind]
        with torch.no_grad(), chosen.apply(lm, layer=layer, multiplier=multiplier, positions=positions):
            scores = metric(lm)
            effects = side_effects(lm, neutral) if neutral is not None else None
        added = abs(multiplier) * chosen.norm(layer)
        rows.append(_row(split, kind, layer, fraction, multiplier, added, scores, effects))
    return rows


@dataclass(frozen=True)
class Choice:
    layer: int
    fraction: float
    effect: float  # score(+f) - score(-f) on the split it was chosen on


def choose_setting(rows: Sequence[dict], max_perplexity_increase: float = 0.2) -> Choice:
    """The (layer, fraction > 0) with the largest score(+f) - score(-f) among settings whose perplexity
    rises by at most `max_perplexity_increase` at both signs; ties go to the smaller fraction."""
    base = {r["layer"]: r for r in rows if r["vector"] == "none"}
    steer_rows = {(r["layer"], r["fraction"]): r for r in rows if r["vector"] == "steering"}
    best: Choice | None = None
    for (layer, fraction), plus in sorted(steer_rows.items()):
        minus = steer_rows.get((layer, -fraction))
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
            best = Choice(layer, fraction, effect)
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
