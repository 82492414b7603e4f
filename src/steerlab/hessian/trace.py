"""Stochastic trace estimates (Hutchinson, Hutch++) with Student-t confidence intervals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from steerlab.io import write_json

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TraceEstimate:
    """`estimate` with a `confidence` two-sided interval [low, high] from the probes' sample variance."""

    estimate: float
    low: float
    high: float
    stderr: float
    confidence: float
    n_products: int
    method: str
    samples: list[float]

    def save(self, path) -> None:
        write_json(path, asdict(self))


def _rademacher(dim: int, m: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (dim, m), generator=gen).double() * 2 - 1


def _interval(base: float, samples: np.ndarray, confidence: float) -> tuple[float, float, float, float]:
    """(base + mean, low, high, stderr) with a two-sided Student-t interval from the samples."""
    from scipy.stats import t as student_t

    mean = base + samples.mean()
    if len(samples) < 2:
        return mean, -np.inf, np.inf, np.inf
    stderr = samples.std(ddof=1) / np.sqrt(len(samples))
    half = student_t.ppf(0.5 + confidence / 2, df=len(samples) - 1) * stderr
    return mean, mean - half, mean + half, stderr


def hutchinson(
    matvec: MatVec,
    dim: int,
    n_probes: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> TraceEstimate:
    """tr(A) ~ mean of z^T A z over Rademacher probes z."""
    gen = torch.Generator().manual_seed(seed)
    z = _rademacher(dim, n_probes, gen)
    samples = np.array(
        [
            float(z[:, i] @ matvec(z[:, i]).cpu())
            for i in tqdm(range(n_probes), disable=not progress, desc="hutchinson")
        ]
    )
    mean, low, high, se = _interval(0.0, samples, confidence)
    return TraceEstimate(mean, low, high, se, confidence, n_probes, "hutchinson", samples.tolist())


def hutchpp(
    matvec: MatVec,
    dim: int,
    n_products: int = 99,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched top subspace + Hutchinson on the rest.

    A third of the products sketch Q = orth(A S), a third compute tr(Q^T A Q), a third estimate the
    deflated remainder tr((I-QQ^T) A (I-QQ^T)); the interval comes from the remainder's probes only
    (the sketched part is exact given Q).
    """
    m = max(n_products // 3, 2)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=3 * m, disable=not progress, desc="hutch++")

    def apply(cols: torch.Tensor) -> torch.Tensor:
        out = []
        for j in range(cols.shape[1]):
            out.append(matvec(cols[:, j]).double().cpu())
            bar.update(1)
        return torch.stack(out, dim=1)

    s = _rademacher(dim, m, gen)
    q, _ = torch.linalg.qr(apply(s))
    top = float(torch.trace(q.T @ apply(q)))
    g = _rademacher(dim, m, gen)
    g = g - q @ (q.T @ g)
    ag = apply(g)
    ag = ag - q @ (q.T @ ag)
    bar.close()
    samples = (g * ag).sum(0).numpy()
    mean, low, high, se = _interval(top, samples, confidence)
    return TraceEstimate(mean, low, high, se, confidence, 3 * m, "hutch++", samples.tolist())


METHODS = {"hutchpp": hutchpp, "hutchinson": hutchinson}
"""Trace estimators by name; each takes (matvec, dim, number of products, confidence=, seed=, progress=)."""
