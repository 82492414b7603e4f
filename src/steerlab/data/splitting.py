"""Deterministic shuffled splits and content fingerprints shared by every dataset type."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from typing import Any, TypeVar

from steerlab.errors import UserError

T = TypeVar("T")


def split_indices(n: int, fractions: Sequence[float], seed: int = 0) -> list[list[int]]:
    """Shuffle range(n) with `seed` and cut it into consecutive parts of sizes ~ n * fraction.

    The fractions must be non-negative and sum to 1; the cut points are round(n * cumulative fraction), so
    the sizes sum to n exactly and the parts are disjoint.
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(f < 0 or not math.isfinite(f) for f in fractions):
        raise ValueError(f"split fractions must be non-negative numbers, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum {sum(fractions)})")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cuts, total = [0], 0.0
    for fraction in fractions[:-1]:
        total += fraction
        cuts.append(min(n, max(cuts[-1], round(n * total))))
    cuts.append(n)
    return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def fingerprint(payload: Any) -> str:
    """sha256 of the canonical JSON of `payload` (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


SPLITS = {"train": 0.5, "validation": 0.25, "test": 0.25}
"""The named parts every command cuts a dataset into (shuffled with the seed): extract on "train",
choose a setting on "validation", report on "test"."""


def subset(dataset: T, *, split: str | None = None, limit: int | None = None, seed: int = 0) -> T:
    """The named part of `dataset` (see `SPLITS`; None: all of it), then its first `limit` items.

    Works on any dataset with `split(fractions, seed)`, `len` and slicing (A/B items, paired texts,
    prompts). Raises a `UserError` for an unknown split, a limit below 1, or an empty result.
    """
    where = getattr(dataset, "source", "") or getattr(dataset, "name", "") or "dataset"
    total = len(dataset)  # type: ignore[arg-type]
    if split is not None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        parts = dataset.split(list(SPLITS.values()), seed=seed)  # type: ignore[attr-defined]
        dataset = parts[list(SPLITS).index(split)]
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be at least 1, got {limit}")
        dataset = dataset[:limit]  # type: ignore[index]
    if not len(dataset):  # type: ignore[arg-type]
        shares = ", ".join(f"{name} {share:.0%}" for name, share in SPLITS.items())
        part = f"the {split!r} part ({shares}) of its {total} item(s)" if split else "it"
        raise UserError(f"{where}: {part} holds no items")
    return dataset
