"""Small statistics helpers: bootstrap confidence intervals and AUROC."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(
    values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of `values` and its percentile bootstrap (1 - alpha) interval."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(values.mean()), float(low), float(high)


def auroc(positive_scores, negative_scores) -> float:
    """Probability that a random positive scores above a random negative (ties count one half)."""
    pos = np.asarray(positive_scores, dtype=np.float64)[:, None]
    neg = np.asarray(negative_scores, dtype=np.float64)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())
