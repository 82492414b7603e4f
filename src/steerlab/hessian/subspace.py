"""Subspace tools: principal angles, projections, ±t perturbation sweeps and specialisation scores."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from steerlab.hessian.params import unflatten


def orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the rows of `basis` (k x dim)."""
    q, _ = torch.linalg.qr(basis.double().T)
    return q.T


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Principal angles (radians, ascending) between the row spaces of `a` (ka x dim) and `b` (kb x dim)."""
    qa, qb = orthonormal(a), orthonormal(b)
    sigma = torch.linalg.svdvals(qa @ qb.T).clamp(-1, 1)
    return np.arccos(sigma.numpy())


def random_angle_baseline(dim: int, ka: int, kb: int, trials: int = 20, seed: int = 0) -> dict:
    """Principal angles between random subspaces of the same sizes: mean and sd over `trials` (degrees)."""
    gen = torch.Generator().manual_seed(seed)
    angles = np.stack(
        [
            principal_angles(
                torch.randn(ka, dim, generator=gen, dtype=torch.float64),
                torch.randn(kb, dim, generator=gen, dtype=torch.float64),
            )
            for _ in range(trials)
        ]
    )
    deg = np.degrees(angles)
    return {"mean_deg": deg.mean(0).tolist(), "sd_deg": deg.std(0).tolist()}


def project_out(v: torch.Tensor, basis: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """Remove from `v` its component in the row space of `basis`; rescale to the norm of `v` if asked."""
    q = orthonormal(basis)
    out = v.double() - q.T @ (q @ v.double())
    if normalise:
        norm = out.norm()
        if norm < 1e-12 * max(float(v.norm()), 1e-300):
            raise ValueError("vector lies inside the subspace: nothing left after projection")
        out = out * (v.double().norm() / norm)
    return out


@contextlib.contextmanager
def perturbed(params: dict[str, nn.Parameter], delta: torch.Tensor) -> Iterator[None]:
    """Temporarily add the flat vector `delta` to `params`; the exact original values are restored on exit."""
    tensors = list(params.values())
    saved = [p.detach().clone() for p in tensors]
    try:
        with torch.no_grad():
            for p, d in zip(tensors, unflatten(delta, tensors)):
                p.add_(d)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(tensors, saved):
                p.copy_(s)


def perturbation_sweep(
    params: dict[str, nn.Parameter],
    direction: torch.Tensor,
    ts: Sequence[float],
    metrics: dict[str, Callable[[], float]],
) -> dict[str, list[float]]:
    """Metrics at theta + t*direction, averaged over +t and -t (eigenvector signs are arbitrary).

    Returns {metric: [value at each t]} plus "t".
    """
    out: dict[str, list[float]] = {"t": [float(t) for t in ts]}
    for name in metrics:
        out[name] = []
    for t in ts:
        vals = {name: 0.0 for name in metrics}
        for sign in (1.0, -1.0):
            with perturbed(params, sign * float(t) * direction):
                for name, fn in metrics.items():
                    vals[name] += fn() / 2
        for name in metrics:
            out[name].append(vals[name])
    return out


def specialisation(qd: np.ndarray, qp: np.ndarray) -> np.ndarray:
    """r = qd / (qd + qp) from curvatures v^T G_D v and v^T G_P v (absolute values taken)."""
    qd, qp = np.abs(np.asarray(qd, float)), np.abs(np.asarray(qp, float))
    return qd / np.maximum(qd + qp, 1e-300)


def specialised_fraction(r: np.ndarray, low: float = 0.1, high: float = 0.9) -> float:
    r = np.asarray(r)
    return float(np.mean((r < low) | (r > high)))
