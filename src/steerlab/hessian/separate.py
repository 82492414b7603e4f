"""Finding separable weight-space directions from mixed data alone (no subset labels).

Method ("curvature ICA"): take the top-m eigenvectors U of the mixed-data curvature. Per sample i the
Gauss-Newton curvature restricted to span(U) is A_i = (J_i U)^T L_i (J_i U) with L_i = d^2 loss/d logits^2.
Whiten so that sum_i A_i = I; then every unit w has the same total curvature and
f(w) = sum_i (w^T A_i w)^2 measures only how *concentrated* its curvature is across samples. A direction
used by one independent skill only carries curvature on the samples that exercise that skill, so it is
more concentrated than a mixture. We maximise sum_j f(w_j) over orthonormal W by a symmetric fixed-point
iteration (as in symmetric FastICA) and map back v_j = U M^{-1/2} w_j.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp

from steerlab.hessian.params import unflatten


def output_jvps(
    model: nn.Module, params: dict[str, nn.Parameter], inputs: torch.Tensor, directions: torch.Tensor
) -> torch.Tensor:
    """J u_j for every sample and every direction: (n_samples, n_outputs, n_directions), float64."""
    names = list(params)
    base = {n: p.detach() for n, p in params.items()}
    tensors = list(base.values())

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), (inputs,))

    cols = []
    for u in directions:
        tangents = tuple(unflatten(u, tensors))
        _, ju = jvp(f, tuple(tensors), tangents)
        cols.append(ju.double())
    return torch.stack(cols, dim=-1)


def softmax_ce_curvature(logits: torch.Tensor) -> torch.Tensor:
    """d^2 CE / d logits^2 = diag(p) - p p^T per sample: (n, c, c)."""
    p = torch.softmax(logits.double(), -1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def per_sample_curvatures(jus: torch.Tensor, loss_curv: torch.Tensor) -> torch.Tensor:
    """A_i = (J_i U)^T L_i (J_i U): (n, m, m)."""
    return torch.einsum("ncm,ncd,ndk->nmk", jus, loss_curv, jus)


def _sym_orth(w: torch.Tensor) -> torch.Tensor:
    u, _, vt = torch.linalg.svd(w, full_matrices=False)
    return u @ vt


def curvature_ica(
    a: torch.Tensor, n_components: int | None = None, iters: int = 500, seed: int = 0, tol: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rotate within the span of the per-sample curvatures `a` (n, m, m) to maximise concentration.

    Returns (coeffs (k, m): directions in the original m-dim coordinates, unit-normalised; concentration
    f per direction; info). Uses only the per-sample curvatures, never any sample grouping.
    """
    n, m, _ = a.shape
    k = n_components or m
    total = a.sum(0)
    evals, evecs = torch.linalg.eigh(total)
    keep = evals > 1e-12 * evals.max()
    whiten = evecs[:, keep] / evals[keep].sqrt()  # M^{-1/2} on its range
    aw = torch.einsum("pm,nmq,qk->npk", whiten.T, a, whiten)
    mw = aw.shape[1]
    gen = torch.Generator().manual_seed(seed)
    w = _sym_orth(torch.randn(min(k, mw), mw, generator=gen, dtype=torch.float64))
    last = -np.inf
    iterations = 0
    for _ in range(iters):
        iterations += 1
        c = torch.einsum("jm,nmk,jk->nj", w, aw, w)  # (n, k) curvature of each sample along each w_j
        grad = torch.einsum("nj,nmk,jk->jm", c, aw, w)
        w = _sym_orth(grad)
        f = float((c**2).sum())
        if abs(f - last) <= tol * abs(f):
            break
        last = f
    c = torch.einsum("jm,nmk,jk->nj", w, aw, w)
    coeffs = (whiten @ w.T).T
    coeffs = coeffs / coeffs.norm(dim=1, keepdim=True)
    conc = (c**2).sum(0)
    order = torch.argsort(conc, descending=True)
    return coeffs[order], conc[order], {"iterations": iterations, "whitened_dim": mw}


def separable_directions(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: torch.Tensor,
    basis: torch.Tensor,
    n_components: int | None = None,
    seed: int = 0,
    loss_curvature: Callable[[torch.Tensor], torch.Tensor] = softmax_ce_curvature,
) -> tuple[torch.Tensor, dict]:
    """Curvature-ICA directions (k, dim) inside the row space of `basis` (m, dim, orthonormal rows),
    computed from unlabelled mixed `inputs` of a classifier (labels are not needed: the GGN is label-free)."""
    with torch.no_grad():
        logits = model(inputs)
    jus = output_jvps(model, params, inputs, basis)
    a = per_sample_curvatures(jus, loss_curvature(logits))
    coeffs, conc, info = curvature_ica(a, n_components, seed=seed)
    dirs = coeffs @ basis.double()
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    return dirs, {**info, "concentration": conc.tolist()}
