"""Language-model helpers: text sets, parameter selection by layer, and two-set curvature comparison."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from steerlab.hessian.lanczos import Eigenpairs, lanczos
from steerlab.hessian.operator import CurvatureOperator
from steerlab.hessian.params import select_params
from steerlab.hessian.subspace import (
    principal_angles,
    random_angle_baseline,
    specialisation,
    specialised_fraction,
)
from steerlab.hessian.tasks import lm_batches, lm_task


def read_texts(path: str | os.PathLike, n: int = 16, min_chars: int = 40) -> list[str]:
    """The first `n` paragraphs (blank-line separated; long ones cut to 400 chars) with >= `min_chars`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    paras = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(errors="replace"))]
    out = [p[:400] for p in paras if len(p) >= min_chars]
    if not out:
        raise ValueError(f"{path}: no paragraph of at least {min_chars} characters")
    return out[:n]


def layer_params(model: nn.Module, layers: list[int], part: str = "mlp") -> dict[str, nn.Parameter]:
    """Parameters of the MLP / attention / whole block of the given decoder layers (negative indices allowed)."""
    from steerlab.models import attention, block, mlp

    getter = {"mlp": mlp, "attention": attention, "block": block}.get(part)
    if getter is None:
        raise ValueError(f"part must be mlp, attention or block, not {part!r}")
    return select_params(model, modules=[getter(model, layer) for layer in layers])


def two_set_spectra(
    model: nn.Module,
    tokenizer,
    texts_a: list[str],
    texts_b: list[str],
    params: dict[str, nn.Parameter],
    k: int = 5,
    batch_size: int = 4,
    max_length: int = 48,
    tol: float = 1e-4,
    max_iter: int = 60,
    progress: bool = True,
) -> dict:
    """Top-k Hessian eigenpairs of the next-token loss on two text sets, the principal angles between
    them (with a random-subspace baseline) and each top vector's specialisation
    r = |v^T H_A v| / (|v^T H_A v| + |v^T H_B v|) (absolute curvatures)."""
    task = lm_task()
    ops = {
        name: CurvatureOperator(model, task, lm_batches(tokenizer, texts, batch_size, max_length), params)
        for name, texts in (("a", texts_a), ("b", texts_b))
    }
    eig: dict[str, Eigenpairs] = {
        name: lanczos(op.matvec, op.dim, k=k, which="LA", tol=tol, max_iter=max_iter, progress=progress)
        for name, op in ops.items()
    }
    vecs = torch.cat([eig["a"].vectors, eig["b"].vectors])
    qa = np.array([ops["a"].quadratic(v) for v in vecs])
    qb = np.array([ops["b"].quadratic(v) for v in vecs])
    r = specialisation(qa, qb)
    dim = ops["a"].dim
    return {
        "eigenpairs": eig,
        "dim": dim,
        "principal_angles_deg": np.degrees(principal_angles(eig["a"].vectors, eig["b"].vectors)).tolist(),
        "random_angle_baseline_deg": random_angle_baseline(dim, k, k, trials=3)["mean_deg"],
        "r_top_a": r[:k].tolist(),
        "r_top_b": r[k:].tolist(),
        "specialised_fraction": specialised_fraction(r),
        "n_products": sum(op.n_products for op in ops.values()),
    }
