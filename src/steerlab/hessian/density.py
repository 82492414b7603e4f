"""Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019; Lin et al. 2016)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from steerlab.hessian.lanczos import _tridiag_eig, lanczos_tridiagonal
from steerlab.io import load_result, save_result

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SpectralDensity:
    """Quadrature nodes/weights per probe; each probe's weights sum to 1 (a probability measure)."""

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    n_products: int
    meta: dict = field(default_factory=dict)

    @property
    def support(self) -> tuple[float, float]:
        return float(min(n.min() for n in self.nodes)), float(max(n.max() for n in self.nodes))

    def moment(self, p: int) -> float:
        """Estimate of (1/dim) tr(A^p)."""
        return float(np.mean([np.sum(w * n**p) for n, w in zip(self.nodes, self.weights)]))

    def smooth(self, grid: np.ndarray | None = None, sigma: float | None = None, n_grid: int = 1000):
        """Gaussian-broadened density on `grid` (default: the support padded by 5 sigma); integrates to ~1."""
        lo, hi = self.support
        width = max(hi - lo, 1e-12)
        sigma = sigma if sigma is not None else 0.01 * width
        if grid is None:
            grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid)
        dens = np.zeros_like(grid)
        for n, w in zip(self.nodes, self.weights):
            dens += (w[None, :] * np.exp(-((grid[:, None] - n[None, :]) ** 2) / (2 * sigma**2))).sum(1)
        dens /= len(self.nodes) * sigma * np.sqrt(2 * np.pi)
        return grid, dens

    def save(self, folder, name: str = "density") -> None:
        tensors = {}
        for i, (n, w) in enumerate(zip(self.nodes, self.weights)):
            tensors[f"nodes_{i}"] = torch.from_numpy(np.ascontiguousarray(n))
            tensors[f"weights_{i}"] = torch.from_numpy(np.ascontiguousarray(w))
        meta = {"n_products": self.n_products, "n_probes": len(self.nodes), **self.meta}
        save_result(Path(folder) / name, tensors, meta, kind="SpectralDensity")

    @classmethod
    def load(cls, folder, name: str = "density") -> SpectralDensity:
        t, meta = load_result(Path(folder) / name, kind="SpectralDensity")
        k = meta.pop("n_probes")
        nodes = [t[f"nodes_{i}"].numpy() for i in range(k)]
        weights = [t[f"weights_{i}"].numpy() for i in range(k)]
        return cls(nodes, weights, meta.pop("n_products"), meta)


def tridiagonal_density(alphas, betas, meta: dict | None = None) -> SpectralDensity:
    """The one-probe quadrature of a Lanczos tridiagonal T (diagonal `alphas`, off-diagonal `betas`):
    nodes the eigenvalues of T, weights the squared first components of its eigenvectors. A `lanczos` run
    from its random start (v0=None) is thus one probe of `slq_density` with the same seed and steps."""
    theta, s = _tridiag_eig(list(alphas), list(betas))
    return SpectralDensity([theta], [s[0] ** 2], len(alphas), dict(meta or {}))


def slq_density(
    matvec: MatVec,
    dim: int,
    n_probes: int = 4,
    steps: int = 80,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 5,
    basis_dtype: torch.dtype = torch.float64,
    basis_dir: str | Path | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: per Gaussian probe, run `steps` Lanczos steps; nodes are the Ritz values,
    weights the squared first components of T's eigenvectors. For probe q, sum_i w_i theta_i^p equals
    q^T A^p q / |q|^2 exactly for p <= 2*steps - 1.

    `checkpoint`: a folder with one sub-folder per probe (see `lanczos_tridiagonal`); a rerun after an
    interruption skips finished probes and resumes the current one, giving the identical density.
    `basis_dtype` / `basis_dir`: storage of each probe's Krylov basis, as in `lanczos`."""
    gen = torch.Generator().manual_seed(seed)
    nodes, weights, products = [], [], 0
    bar = tqdm(total=n_probes * min(steps, dim), disable=not progress, desc="slq products")

    def counted(v: torch.Tensor) -> torch.Tensor:
        bar.update(1)
        return matvec(v)

    for i in range(n_probes):
        q = torch.randn(dim, generator=gen, dtype=torch.float64)
        folder = Path(checkpoint) / f"probe-{i}" if checkpoint is not None else None
        alphas, betas = lanczos_tridiagonal(
            counted, q, steps, True, folder, checkpoint_every, basis_dtype=basis_dtype, basis_dir=basis_dir
        )
        products += len(alphas)
        one = tridiagonal_density(alphas, betas)
        nodes += one.nodes
        weights += one.weights
    bar.close()
    meta = {"steps": steps, "seed": seed, "dim": dim, "basis_dtype": str(basis_dtype).removeprefix("torch.")}
    return SpectralDensity(nodes, weights, products, meta)
