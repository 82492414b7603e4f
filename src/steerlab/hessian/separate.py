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
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Curvature-ICA directions (k, dim) inside the row space of `basis` (m, dim, orthonormal rows),
    computed from unlabelled mixed `inputs` of a classifier (labels are not needed: the GGN is label-free).
    `sample_weights` w_i, if given, replace every per-sample curvature A_i by w_i A_i."""
    with torch.no_grad():
        logits = model(inputs)
    jus = output_jvps(model, params, inputs, basis)
    a = per_sample_curvatures(jus, loss_curvature(logits))
    if sample_weights is not None:
        a = a * sample_weights.double()[:, None, None]
    coeffs, conc, info = curvature_ica(a, n_components, seed=seed)
    dirs = coeffs @ basis.double()
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    return dirs, {**info, "concentration": conc.tolist()}


def _kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 100, restarts: int = 5) -> torch.Tensor:
    """Plain k-means (k-means++ init, best of `restarts`); returns labels."""
    gen = torch.Generator().manual_seed(seed)
    best, best_cost = None, float("inf")
    for _ in range(restarts):
        centres = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
        for _ in range(k - 1):
            d2 = torch.cdist(x, torch.stack(centres)).min(1).values ** 2
            centres.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)].squeeze(0))
        c = torch.stack(centres)
        for _ in range(iters):
            labels = torch.cdist(x, c).argmin(1)
            new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
            if torch.allclose(new, c):
                break
            c = new
        cost = float((torch.cdist(x, c).min(1).values ** 2).sum())
        if cost < best_cost:
            best, best_cost = labels, cost
    return best


def curvature_clusters(
    a: torch.Tensor, n_clusters: int = 3, n_components: int = 20, seed: int = 0
) -> tuple[torch.Tensor, dict]:
    """Second method: cluster samples by their trace-normalised curvature profile A_i / tr(A_i), pick the
    two clusters whose mean profiles are least alike, and return the generalised eigenvectors of
    (A_1, A_1 + A_2) at both ends (n_components/2 each): the directions whose curvature ratio between the
    two discovered groups is most extreme. No sample grouping is given; it is discovered.

    Returns (coeffs (n_components, m) unit-norm, info with cluster sizes and the chosen pair).
    """
    n, m, _ = a.shape
    tr = a.diagonal(dim1=1, dim2=2).sum(1).clamp_min(1e-300)
    profiles = (a / tr[:, None, None]).reshape(n, -1)
    labels = _kmeans(profiles, n_clusters, seed)
    means = [profiles[labels == j].mean(0) for j in range(n_clusters)]
    best, pair = float("inf"), (0, 1)
    for i in range(n_clusters):
        for j in range(i + 1, n_clusters):
            if not ((labels == i).any() and (labels == j).any()):
                continue
            cos = float(means[i] @ means[j] / (means[i].norm() * means[j].norm()))
            if cos < best:
                best, pair = cos, (i, j)
    a1 = a[labels == pair[0]].sum(0)
    a2 = a[labels == pair[1]].sum(0)
    both = a1 + a2
    evals, evecs = torch.linalg.eigh(both)
    keep = evals > 1e-12 * evals.max()
    w = evecs[:, keep] / evals[keep].sqrt()  # both^{-1/2} on its range
    g_vals, g_vecs = torch.linalg.eigh(w.T @ a1 @ w)  # ratio r in [0, 1], ascending
    half = n_components // 2
    idx = torch.cat(
        [torch.arange(len(g_vals) - 1, len(g_vals) - 1 - half, -1), torch.arange(n_components - half)]
    )
    coeffs = (w @ g_vecs[:, idx]).T
    coeffs = coeffs / coeffs.norm(dim=1, keepdim=True)
    info = {
        "cluster_sizes": [int((labels == j).sum()) for j in range(n_clusters)],
        "pair": list(pair),
        "pair_cosine": best,
        "group_ratio": g_vals[idx].tolist(),
    }
    return coeffs, {**info, "labels": labels}


def cluster_directions(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: torch.Tensor,
    basis: torch.Tensor,
    n_components: int = 20,
    n_clusters: int = 3,
    seed: int = 0,
    loss_curvature: Callable[[torch.Tensor], torch.Tensor] = softmax_ce_curvature,
) -> tuple[torch.Tensor, dict]:
    """`curvature_clusters` directions (n_components, dim) inside the row space of `basis`, from
    unlabelled `inputs` only."""
    with torch.no_grad():
        logits = model(inputs)
    a = per_sample_curvatures(output_jvps(model, params, inputs, basis), loss_curvature(logits))
    coeffs, info = curvature_clusters(a, n_clusters, n_components, seed)
    dirs = coeffs @ basis.double()
    return dirs / dirs.norm(dim=1, keepdim=True), info


def per_sample_ggn_traces(
    model: nn.Module, params: dict[str, nn.Parameter], inputs: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """tr(G_i) = tr(L_i J_i J_i^T) for every sample (softmax-CE Gauss-Newton, label-free), exact, chunked."""
    from torch.func import jacrev, vmap

    names = list(params)
    base = {n: p.detach() for n, p in params.items()}

    def single(ps, x):
        return functional_call(model, dict(zip(names, ps)), (x[None],))[0]

    out = []
    for start in range(0, len(inputs), chunk):
        x = inputs[start : start + chunk]
        jac = vmap(jacrev(single), in_dims=(None, 0))(tuple(base.values()), x)  # tuple of (b, c, *shape)
        ntk = sum(torch.einsum("bc...,bd...->bcd", j.double(), j.double()) for j in jac)
        with torch.no_grad():
            lc = softmax_ce_curvature(model(x))
        out.append(torch.einsum("bcd,bdc->b", lc, ntk))
    return torch.cat(out)


def equalised_ggn_task():
    """GGN task on batches (inputs, soft_targets, weights): weighted soft-target CE, whose logit Hessian is the
    label-free diag(p) - pp^T; with weights 1/tr(G_i) every sample contributes equal total curvature."""
    import torch.nn.functional as F

    from steerlab.hessian.tasks import LossTask

    def loss(out, batch):
        _, q, w = batch
        per = -(q * F.log_softmax(out, -1)).sum(-1)
        return (w * per).sum() / w.sum()

    return LossTask(
        forward=lambda model, batch: model(batch[0]),
        loss=loss,
        weight=lambda batch: float(batch[2].sum()),
        name="equalised-softmax-ggn",
    )


def tempered_weights(traces: torch.Tensor, alpha: float) -> torch.Tensor:
    """w_i = tr(G_i)^(-alpha), scaled to mean 1 (float64). alpha = 0 is the plain GGN, alpha = 1 gives every
    sample equal total curvature; in between tempers the dominance of a few very confident samples."""
    t = traces.double().clamp_min(1e-12 * float(traces.max()))
    w = t.pow(-alpha)
    return w / w.mean()


def tempered_basis(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: torch.Tensor,
    alpha: float,
    k: int = 20,
    seed: int = 0,
    tol: float = 1e-6,
    traces: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Top-`k` eigenvectors (k, dim) of the tempered, sample-weighted Gauss-Newton matrix sum_i w_i G_i with
    w_i = tr(G_i)^(-alpha) (`tempered_weights`), the weights, and info. Uses the unlabelled `inputs` only;
    pass `traces` (`per_sample_ggn_traces`) to reuse them."""
    from steerlab.hessian.lanczos import lanczos
    from steerlab.hessian.operator import CurvatureOperator

    if traces is None:
        traces = per_sample_ggn_traces(model, params, inputs)
    w = tempered_weights(traces, alpha)
    with torch.no_grad():
        q = torch.softmax(model(inputs), -1)
    op = CurvatureOperator(
        model, equalised_ggn_task(), [(inputs, q, w.to(q.dtype))], params, kind="ggn", cache_graph=True
    )
    eig = lanczos(op.matvec, op.dim, k=k, which="LA", tol=tol, seed=seed, progress=False)
    info = {
        "alpha": alpha,
        "n_products": eig.n_products,
        "trace_ratio_max_min": float(traces.max() / traces.min()),
        "weight_ratio_max_min": float(w.max() / w.min()),
        "eigenvalues": eig.values.tolist(),
    }
    return eig.vectors[:k].double(), w, info


def tempered_directions(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: torch.Tensor,
    alpha: float,
    n_components: int = 20,
    ica: bool = True,
    seed: int = 0,
    tol: float = 1e-6,
    traces: torch.Tensor | None = None,
    basis: int | None = None,
    weighted_ica: bool = False,
) -> tuple[torch.Tensor, dict]:
    """`n_components` directions from the tempered GGN (`tempered_basis`): its top eigenvectors, or (`ica`)
    curvature ICA within its top-`basis` eigenvectors (default `n_components`), with each sample's curvature
    weighted by the same w_i if `weighted_ica`."""
    m = basis or n_components
    vectors, w, info = tempered_basis(
        model, params, inputs, alpha, m if ica else n_components, seed, tol, traces
    )
    if not ica:
        return vectors, info
    dirs, ica_info = separable_directions(
        model, params, inputs, vectors, n_components, seed=seed, sample_weights=w if weighted_ica else None
    )
    return dirs, {**info, **ica_info}


def equalised_directions(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: torch.Tensor,
    n_components: int = 20,
    seed: int = 0,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, dict]:
    """Third method: top eigenvectors of the *sample-equalised* Gauss-Newton matrix sum_i G_i / tr(G_i)
    (so confidently-handled samples, whose skill carries little raw curvature, are not drowned out), then
    curvature ICA inside them: `tempered_directions` with alpha = 1."""
    dirs, info = tempered_directions(model, params, inputs, 1.0, n_components, ica=True, seed=seed, tol=tol)
    return dirs, {k: v for k, v in info.items() if k not in ("alpha", "weight_ratio_max_min", "eigenvalues")}
