"""Restricting a steering vector to a subset of the residual dimensions (the rest set to zero).

k = ceil(fraction x D) of the D dimensions (at least 1) are kept, chosen by one of:

- "first": dimensions 0..k-1 (what the ActAdd post did with the first 70% of GPT-2-XL's residual);
- "random": k dimensions drawn without replacement with a seeded generator (the same for every layer;
  with one seed, a smaller fraction keeps a subset of the dimensions a larger one keeps);
- "top": the k largest |v_i| of each layer's vector (ties go to the lower index).

The restricted vector keeps the original's residual norms, so a fraction of the residual norm still adds
the same norm (the multiplier grows as the restricted vector shrinks); a raw multiplier m adds m x the
restricted vector, as in the ActAdd post.
"""

from __future__ import annotations

import math

import torch

from steerlab.errors import UserError
from steerlab.steering.vector import SteeringVector

SELECTIONS = ("first", "random", "top")
ALIASES = {"first-k": "first", "random-k": "random", "top-k": "top"}


def check_selection(selection: str, option: str = "selection") -> str:
    """The canonical name of a dimension selection ('first-k' -> 'first'); else a `UserError` naming
    `option`."""
    name = ALIASES.get(selection, selection)
    if name not in SELECTIONS:
        raise UserError(
            f"{option}: unknown dimension selection {selection!r}; use one of {', '.join(SELECTIONS)}"
        )
    return name


def check_fraction(fraction: float, option: str = "fraction") -> float:
    """`fraction` when it is in (0, 1]; else a `UserError` naming `option`."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise UserError(f"{option}: a fraction of the dimensions must be in (0, 1], got {fraction!r}")
    return float(fraction)


def dimension_count(fraction: float, width: int, option: str = "fraction") -> int:
    """k = ceil(fraction x width), at least 1."""
    return max(1, math.ceil(check_fraction(fraction, option) * width - 1e-9))


def dimension_indices(values: torch.Tensor, selection: str, fraction: float, seed: int = 0) -> torch.Tensor:
    """The kept dimensions (sorted int64 indices) of a (D,) vector; only "top" looks at its values."""
    selection = check_selection(selection)
    width = int(values.numel())
    k = dimension_count(fraction, width)
    if selection == "first":
        chosen = torch.arange(k)
    elif selection == "random":
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(width, generator=generator)[:k]
    else:
        chosen = torch.argsort(-values.detach().double().abs().cpu().reshape(-1), stable=True)[:k]
    return chosen.sort().values


def dimension_mask(values: torch.Tensor, selection: str, fraction: float, seed: int = 0) -> torch.Tensor:
    """Boolean (D,) mask of the kept dimensions."""
    mask = torch.zeros(int(values.numel()), dtype=torch.bool)
    mask[dimension_indices(values, selection, fraction, seed)] = True
    return mask


def restrict(
    vector: SteeringVector,
    selection: str,
    fraction: float,
    seed: int = 0,
    reference: SteeringVector | None = None,
) -> SteeringVector:
    """`vector` with every dimension outside the selection set to zero, at every stored layer.

    reference: the vector whose |v_i| choose the "top" dimensions (default `vector`); a control vector
    restricted to its steering vector's dimensions passes the steering vector here. The metadata records
    the restriction under "dimensions" (selection, fraction, k, width and, for "random", the seed).
    """
    selection = check_selection(selection)
    reference = reference or vector
    vectors = {}
    for layer, vec in vector.vectors.items():
        mask = dimension_mask(reference.vectors[layer], selection, fraction, seed).to(vec.device)
        kept = vec * mask.to(vec.dtype)
        if not bool(kept.any()):
            raise UserError(
                f"layer {layer}: the vector is zero on all {int(mask.sum())} dimensions kept by "
                f"{selection} {fraction:g}; keep a larger fraction"
            )
        vectors[layer] = kept
    how = {
        "selection": selection,
        "fraction": float(fraction),
        "k": int(mask.sum()),
        "width": int(mask.numel()),
    }
    if selection == "random":
        how["seed"] = seed
    metadata = {**vector.metadata, "dimensions": how}
    metadata["norms"] = {str(layer): float(vec.double().norm()) for layer, vec in vectors.items()}
    return SteeringVector(vectors, metadata)


def with_norms_of(vector: SteeringVector, like: SteeringVector) -> SteeringVector:
    """`vector` rescaled to the per-layer norms of `like` (a control at the same norm as its vector)."""
    vectors = {
        layer: (vec.double() * (like.vectors[layer].double().norm() / vec.double().norm())).to(vec.dtype)
        for layer, vec in vector.vectors.items()
    }
    metadata = {**vector.metadata, "norms": {str(k): float(v.double().norm()) for k, v in vectors.items()}}
    return SteeringVector(vectors, metadata)
