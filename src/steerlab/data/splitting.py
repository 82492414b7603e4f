"""Deterministic shuffled splits and content fingerprints shared by every dataset type."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from typing import Any


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
