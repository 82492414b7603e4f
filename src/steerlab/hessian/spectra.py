"""Spectrum comparisons: eigenvalue spread across data subsamples, and Hessian vs Gauss-Newton."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from steerlab.hessian.lanczos import lanczos
from steerlab.hessian.operator import CurvatureOperator
from steerlab.hessian.tasks import LossTask


def subsample_spectra(
    model: nn.Module,
    task: LossTask,
    batches: Sequence[Any],
    params: dict[str, nn.Parameter],
    k: int = 5,
    n_subsamples: int = 5,
    fraction: float = 0.5,
    which: str = "LA",
    seed: int = 0,
    progress: bool = True,
    **lanczos_kwargs,
) -> dict:
    """Top-k eigenvalues on `n_subsamples` random subsets of the batches (each keeps `fraction` of them):
    mean, sd and the raw (n_subsamples x k) table. The spread is the data-sampling error of a spectrum."""
    if len(batches) < 2:
        raise ValueError("need at least two batches to subsample; split the data into more batches")
    gen = np.random.default_rng(seed)
    m = max(1, round(fraction * len(batches)))
    table, products = [], 0
    for s in tqdm(range(n_subsamples), disable=not progress, desc="subsample spectra"):
        chosen = sorted(gen.choice(len(batches), size=m, replace=False).tolist())
        op = CurvatureOperator(model, task, [batches[i] for i in chosen], params)
        res = lanczos(op.matvec, op.dim, k=k, which=which, seed=seed + s, progress=False, **lanczos_kwargs)
        table.append(res.values.numpy())
        products += res.n_products
    values = np.stack(table)
    return {
        "mean": values.mean(0).tolist(),
        "sd": values.std(0, ddof=1).tolist(),
        "values": values.tolist(),
        "batches_per_subsample": m,
        "n_products": products,
    }


def hessian_vs_ggn(
    model: nn.Module,
    task: LossTask,
    batches: Sequence[Any],
    params: dict[str, nn.Parameter],
    k: int = 10,
    seed: int = 0,
    progress: bool = True,
    **lanczos_kwargs,
) -> dict:
    """Top-k (largest algebraic) eigenvalues of the Hessian and the GGN, the most negative Hessian
    eigenvalues, and the overlap |<u_i, w_i>| of matching top eigenvectors."""
    ops = {kind: CurvatureOperator(model, task, batches, params, kind=kind) for kind in ("hessian", "ggn")}
    top = {
        kind: lanczos(op.matvec, op.dim, k=k, which="LA", seed=seed, progress=progress, **lanczos_kwargs)
        for kind, op in ops.items()
    }
    bottom = lanczos(
        ops["hessian"].matvec,
        ops["hessian"].dim,
        k=min(k, 5),
        which="SA",
        seed=seed,
        progress=progress,
        **lanczos_kwargs,
    )
    overlap = (top["hessian"].vectors * top["ggn"].vectors).sum(1).abs()
    return {
        "hessian_top": top["hessian"].values.tolist(),
        "ggn_top": top["ggn"].values.tolist(),
        "hessian_bottom": bottom.values.tolist(),
        "eigenvector_overlap": overlap.tolist(),
        "n_products": sum(op.n_products for op in ops.values()),
    }


def blockwise_spectra(
    model: nn.Module,
    task: LossTask,
    batches: Sequence[Any],
    groups: dict[str, str | Sequence[str]],
    k: int = 5,
    which: str = "LA",
    kind: str = "hessian",
    seed: int = 0,
    progress: bool = True,
    **lanczos_kwargs,
) -> dict[str, dict]:
    """Top-k eigenvalues of the diagonal Hessian (or GGN) block of each parameter group.

    `groups` maps a label to include-regex(es), e.g. {f"layer{i}.mlp": rf"layers\\.{i}\\.mlp" for i in ...}.
    """
    from steerlab.hessian.params import select_params

    out = {}
    for label, patterns in tqdm(groups.items(), disable=not progress, desc="blocks"):
        params = select_params(model, include=patterns)
        op = CurvatureOperator(model, task, batches, params, kind=kind)
        res = lanczos(op.matvec, op.dim, k=k, which=which, seed=seed, progress=False, **lanczos_kwargs)
        out[label] = {
            "values": res.values.tolist(),
            "residuals": res.residuals.tolist(),
            "dim": op.dim,
            "n_products": res.n_products,
        }
    return out
