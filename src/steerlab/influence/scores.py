"""Preconditioned query gradients and influence scores (pairwise, self, per token, per module/layer).

score(q, z) = sum_modules < P_q , G_z >,  P_q = (F_approx + damping I)^-1 G_q, with G_q the gradient of
the query loss and G_z the gradient of the training loss of sequence z (both summed over tokens). Positive:
training on z raises the query's measurement (the completion's log-probability). This is the same number
Kronfluence reports when its measurement is the query loss (its "positive = helpful" convention).

Strategies: "identity" (P = G, the gradient dot product; no curvature, so no damping), "diagonal"
(diagonal Fisher), "kfac", "ekfac", and "block": the module's exact Fisher block where it was fitted
(`fit_factors(..., block_max_params=...)`), solved by Cholesky, EK-FAC for the other modules; "unit":
the per-output-unit Fisher blocks (the weights W[o, :] of each output o together; Ollivier's unit-wise
Fisher) where fitted (`unit_max_params`), EK-FAC elsewhere.
For EK-FAC: P = Q_S [(Q_S^T G Q_A) / (Lambda + damping)] Q_A^T.

Damping: `damping` (a number, or {module: number}) is added to the curvature on its per-sequence scale;
None: 0.1 x the module's mean eigenvalue. `weight_decay` (a number or {module: number}) is added on top:
the curvature of a known regulariser (see `damping_for`).
Training gradients are never stored: scores are contracted with the per-token inputs and output gradients
of each batch (per-token scores: ds_t^T P_q a_t, which sum to the sequence score).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from steerlab.hooks.capture import Captured
from steerlab.influence.config import InfluenceArgumentError
from steerlab.influence.factors import Factors, _compute_dtype, per_example_gradients
from steerlab.influence.pass_cache import run_batch
from steerlab.influence.tasks import Task
from steerlab.models.architectures import layers_of

__all__ = [
    "STRATEGIES",
    "Preconditioned",
    "damping_for",
    "eigenvalues_for",
    "has_block",
    "pairwise_scores",
    "per_layer",
    "precondition",
    "query_gradients",
    "score_captured",
    "self_influence_of_batch",
    "self_scores",
]

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac", "block", "unit")

Damping = float | Mapping[str, float] | None


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")


def has_block(factors: Factors | None, name: str) -> bool:
    """Whether module `name` has its exact Fisher block in `factors`."""
    return factors is not None and f"{name}/block" in factors.tensors


def _effective(factors: Factors | None, name: str, strategy: str) -> str:
    """The strategy applied to module `name`: "block" and "unit" fall back to EK-FAC where their blocks
    were not fitted."""
    if strategy in ("block", "unit") and (factors is None or f"{name}/{strategy}" not in factors.tensors):
        return "ekfac"
    return strategy


def eigenvalues_for(factors: Factors, name: str, strategy: str) -> torch.Tensor:
    """The diagonal of the approximate Fisher in its own basis (out x in); for an exact block, the
    diagonal of the block (whose mean is the mean eigenvalue, all the damping heuristic needs)."""
    _check_strategy(strategy)
    strategy = _effective(factors, name, strategy)
    if strategy == "block":
        return torch.diagonal(factors.get(name, "block"))
    if strategy == "unit":
        return torch.diagonal(factors.get(name, "unit"), dim1=-2, dim2=-1)
    if strategy == "ekfac":
        return factors.get(name, "lambda")
    if strategy == "kfac":
        return torch.outer(factors.get(name, "lS"), factors.get(name, "lA"))
    if strategy == "diagonal":
        if f"{name}/diag" not in factors.tensors:
            raise ValueError("strategy 'diagonal' needs factors fitted with diagonal=True")
        return factors.get(name, "diag")
    raise ValueError("the identity strategy has no eigenvalues")


def _per_module(value: float | Mapping[str, float] | None, name: str) -> float | None:
    if isinstance(value, Mapping):
        if name not in value:
            raise KeyError(f"no damping/weight decay given for module {name!r}")
        value = value[name]
    return None if value is None else float(value)


def damping_for(
    factors: Factors | None,
    name: str,
    strategy: str,
    damping: Damping,
    weight_decay: float | Mapping[str, float] = 0.0,
) -> float:
    """The damping added to module `name`'s curvature: `damping` (a number or {module: number}), or
    0.1 x the module's mean eigenvalue (the heuristic, when None), plus `weight_decay`.

    `weight_decay` is the curvature of a known L2 regulariser on the per-sequence scale of the Fisher:
    a training objective mean_over_sequences(summed loss) + wd/2 |theta|^2 has Hessian F + wd I, so pass
    wd; with a loss averaged over the T tokens of each sequence instead, pass T x wd; with a loss summed
    over all N sequences, wd / N."""
    value = _per_module(damping, name)
    if value is None:
        value = 0.1 * float(eigenvalues_for(factors, name, strategy).mean())
    return value + (_per_module(weight_decay, name) or 0.0)


def _check_positive(lowest: float, name: str, damping: float) -> None:
    if not lowest > 0:
        raise InfluenceArgumentError(
            f"damping={damping:g}: module {name} has a curvature eigenvalue + damping of {lowest:g} "
            "(the curvature is singular there, e.g. an input that is always 0), which would divide by "
            "zero; use a damping > 0 (default: 0.1 x mean eigenvalue)"
        )


TokenFactors = tuple[torch.Tensor, torch.Tensor]  # (inputs [Q, T, in], output gradients [Q, T, out])


def precondition(
    grad: torch.Tensor | TokenFactors,
    factors: Factors | None,
    name: str,
    strategy: str = "ekfac",
    damping: Damping = None,
    weight_decay: float | Mapping[str, float] = 0.0,
) -> torch.Tensor:
    """P = (F_approx + damping I)^-1 G for a [Q, out, in] stack of query gradients, computed in the
    gradient's precision (at least float32; float64 gradients stay float64). `grad` may also be the
    per-token factors (a, ds) of G = sum_t ds_t a_t^T: for K-FAC/EK-FAC the rotation into the eigenbasis
    is then (ds Q_S)^T (a Q_A), cheaper than Q_S^T G Q_A when queries have fewer tokens than the
    module's widths."""
    _check_strategy(strategy)
    strategy = _effective(factors, name, strategy)
    if isinstance(grad, tuple):
        a, ds = grad
        dt = torch.promote_types(a.dtype, torch.float32)
        a, ds = a.to(dt), ds.to(dt)
        (t, n_in), n_out = a.shape[1:], ds.shape[-1]
        if strategy in ("kfac", "ekfac") and t * (n_out + n_in) < n_out * n_in:
            qa, qs, lam = _eigenbasis(factors, name, strategy, damping, dt, weight_decay)
            rotated = torch.bmm((ds @ qs).transpose(1, 2), a @ qa)
            return qs @ (rotated / lam) @ qa.T
        grad = per_example_gradients(a, ds)
    dt = torch.promote_types(grad.dtype, torch.float32)
    grad = grad.to(dt)
    if strategy == "identity":
        return grad
    if strategy == "diagonal":
        lam = eigenvalues_for(factors, name, strategy).to(dt)
        d = damping_for(factors, name, strategy, damping, weight_decay)
        _check_positive(float(lam.min()) + d, name, d)
        return grad / (lam + d)
    if strategy in ("block", "unit"):
        return _block_solve(grad, factors, name, damping, weight_decay, strategy)
    qa, qs, lam = _eigenbasis(factors, name, strategy, damping, dt, weight_decay)
    return qs @ ((qs.T @ grad @ qa) / lam) @ qa.T


def _block_solve(
    grad: torch.Tensor,
    factors: Factors,
    name: str,
    damping: Damping,
    weight_decay: float | Mapping[str, float],
    strategy: str = "block",
) -> torch.Tensor:
    """(F_block + damping I)^-1 vec G for a [Q, out, in] stack, by a float64 Cholesky factorisation (one
    damping value needs no eigendecomposition, which would cost ~16x more); "unit": one [in, in] system
    per output unit o for the rows G[:, o, :]."""
    block = factors.get(name, strategy).to(device=grad.device, dtype=torch.float64)
    d = damping_for(factors, name, strategy, damping, weight_decay)
    eye = torch.eye(block.shape[-1], dtype=block.dtype, device=block.device)
    chol, info = torch.linalg.cholesky_ex(block + d * eye)
    if bool((info != 0).any()):
        _check_positive(float(torch.linalg.eigvalsh(block).min()) + d, name, d)
    if strategy == "unit":  # [out, in, Q] right-hand sides against [out, in, in] factors
        rhs = grad.to(torch.float64).permute(1, 2, 0)
        return torch.cholesky_solve(rhs, chol).permute(2, 0, 1).to(grad.dtype)
    flat = grad.reshape(len(grad), -1).to(torch.float64).T
    return torch.cholesky_solve(flat, chol).T.reshape(grad.shape).to(grad.dtype)


def _eigenbasis(
    factors: Factors,
    name: str,
    strategy: str,
    damping: Damping,
    dt: torch.dtype,
    weight_decay: float | Mapping[str, float] = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q_A, Q_S and the damped eigenvalues Lambda + damping of a K-FAC/EK-FAC module, in dtype `dt`
    (refused when one of them is not positive)."""
    eig = eigenvalues_for(factors, name, strategy)
    d = damping_for(factors, name, strategy, damping, weight_decay)
    _check_positive(float(eig.min()) + d, name, d)
    return factors.get(name, "QA").to(dt), factors.get(name, "QS").to(dt), eig.to(dt) + d


@dataclass
class Preconditioned:
    """Per module: `full[name]` [Q, out, in], or, compressed to rank k, `left[name]` [Q, out, k] and
    `right[name]` [Q, in, k] with P ~ left @ right^T."""

    full: dict[str, torch.Tensor]
    left: dict[str, torch.Tensor]
    right: dict[str, torch.Tensor]

    @property
    def modules(self) -> list[str]:
        return list(self.full or self.left)

    @property
    def num_queries(self) -> int:
        first = next(iter((self.full or self.left).values()))
        return int(first.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"full/{k}": v for k, v in self.full.items()}
        out.update({f"left/{k}": v for k, v in self.left.items()})
        out.update({f"right/{k}": v for k, v in self.right.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Preconditioned:
        parts: dict[str, dict[str, torch.Tensor]] = {"full": {}, "left": {}, "right": {}}
        for key, value in tensors.items():
            kind, name = key.split("/", 1)
            parts[kind][name] = value
        return cls(parts["full"], parts["left"], parts["right"])


def compress(p: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k approximation of each [out, in] matrix (SVD): left = U_k S_k, right = V_k."""
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    k = min(rank, s.shape[-1])
    return u[..., :k] * s[..., None, :k], vh[..., :k, :].transpose(-1, -2)


def query_gradients(
    model: nn.Module,
    task: Task,
    queries: Iterable,
    *,
    dtype: torch.dtype | None = None,
    factored: bool = False,
) -> dict[str, torch.Tensor] | dict[str, TokenFactors]:
    """Per-query gradients of the query loss, {module: [Q, out, in]} (queries is an iterable of batches).
    `factored=True`: {module: (inputs [Q, T, in], output gradients [Q, T, out])} instead, whose
    sum_t ds_t a_t^T is the gradient (batches of different lengths are zero-padded to the longest)."""
    modules = task.modules(model)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    for batch in queries:
        cap = run_batch(model, task, modules, batch, query=True, dtype=dtype)
        for name in modules:
            if factored:
                inputs[name].append(cap.inputs[name])
                grads[name].append(cap.grads[name])
            else:
                grads[name].append(per_example_gradients(cap.inputs[name], cap.grads[name]))
    if not factored:
        return {n: torch.cat(c) for n, c in grads.items()}
    return {n: (_cat_padded(inputs[n]), _cat_padded(grads[n])) for n in modules}


def _cat_padded(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [B_i, T_i, d] tensors along the batch, zero-padding the token dimension."""
    length = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[1])) for c in chunks])


def preconditioned_queries(
    grads: Mapping[str, torch.Tensor | TokenFactors],
    factors: Factors | None,
    strategy: str = "ekfac",
    damping: Damping = None,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    consume: bool = False,
    weight_decay: float | Mapping[str, float] = 0.0,
) -> Preconditioned:
    """Precondition every module's query gradients; optionally compress them to rank `rank`.
    `dtype`: of the stored result (default: the gradients' precision, at least float32).
    `consume=True` removes each gradient from `grads` once preconditioned (halves peak memory).
    The identity strategy has no curvature: a `damping` or `weight_decay` given with it is ignored, with
    a warning."""
    if strategy == "identity" and (damping is not None or weight_decay):
        warnings.warn(
            "the identity strategy (plain gradient dot products) has no curvature to damp: "
            "damping/weight_decay are ignored",
            stacklevel=2,
        )
    full, left, right = {}, {}, {}
    for name in list(grads):
        g = grads.pop(name) if consume else grads[name]
        p = precondition(g, factors, name, strategy, damping, weight_decay)
        del g
        if rank is None:
            full[name] = p if dtype is None else p.to(dtype)
        else:
            left[name], right[name] = (t if dtype is None else t.to(dtype) for t in compress(p, rank))
    return Preconditioned(full, left, right)


def score_captured(
    cap: Captured, pre: Preconditioned, per_token: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Scores of one batch against all queries, per module: {name: [Q, B]} and, if `per_token`,
    {name: [Q, B, T]}. Uses the per-token inputs/output gradients; per-sequence gradients exist only
    transiently (one batch, one module) and only when that is cheaper than the token contraction."""
    seq, tok = {}, {}
    for name in pre.modules:
        a, ds = cap.inputs[name], cap.grads[name]
        dt = _compute_dtype(a)
        a, ds = a.to(dt), ds.to(dt)
        b, t, n_in = a.shape
        n_out = ds.shape[-1]
        if name in pre.left:
            left, right = pre.left[name].to(a.device, dt), pre.right[name].to(a.device, dt)
            per = torch.einsum("bto,qok->qbtk", ds, left) * torch.einsum("bti,qik->qbtk", a, right)
            token_scores = per.sum(-1)
        else:
            p = pre.full[name].to(a.device, dt)
            q = p.shape[0]
            if not per_token and t * n_in * n_out + q * n_in * n_out < q * t * n_in * n_out:
                g = per_example_gradients(a, ds).reshape(b, -1)
                seq[name] = p.reshape(q, -1) @ g.T
                continue
            if n_in <= n_out:
                token_scores = (torch.einsum("bto,qoi->qbti", ds, p) * a).sum(-1)
            else:
                token_scores = (torch.einsum("bti,qoi->qbto", a, p) * ds).sum(-1)
        seq[name] = token_scores.sum(-1)
        if per_token:
            tok[name] = token_scores
    return seq, tok


def pairwise_scores(
    model: nn.Module,
    task: Task,
    train: Iterable,
    pre: Preconditioned,
    *,
    per_token: bool = False,
    dtype: torch.dtype | None = None,
) -> dict:
    """In-memory scores of every query against every training example (for small problems; the
    streaming pipeline keeps only top-k). Returns {"scores": [Q, N], "modules": {name: [Q, N]},
    "tokens": list of [Q, T_b] per training example (if per_token)}."""
    modules = {n: m for n, m in task.modules(model).items() if n in pre.modules}
    per_module: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    tokens: list[torch.Tensor] = []
    for batch in train:
        cap = run_batch(model, task, modules, batch, dtype=dtype)
        seq, tok = score_captured(cap, pre, per_token)
        for name in modules:
            per_module[name].append(seq[name])
        if per_token:
            total = sum(tok.values())
            tokens.extend(total[:, i] for i in range(total.shape[1]))
    stacked = {n: torch.cat(v, dim=1) for n, v in per_module.items()}
    result = {"scores": sum(stacked.values()), "modules": stacked}
    if per_token:
        result["tokens"] = tokens
    return result


def self_influence_of_batch(
    cap: Captured,
    factors: Factors | None,
    strategy: str = "ekfac",
    damping: Damping = None,
    weight_decay: float | Mapping[str, float] = 0.0,
) -> torch.Tensor:
    """<G_z, (F_approx + damping I)^-1 G_z> for every example of one captured batch, [B] (float64).
    K-FAC/EK-FAC: sum R^2 / (Lambda + damping) with R = Q_S^T G Q_A = (ds Q_S)^T (a Q_A), so nothing is
    rotated back."""
    total = 0.0
    for name, a in cap.inputs.items():
        ds = cap.grads[name]
        dt = _compute_dtype(a)
        a, ds = a.to(dt), ds.to(dt)
        if _effective(factors, name, strategy) in ("kfac", "ekfac"):
            qa, qs, lam = _eigenbasis(
                factors, name, _effective(factors, name, strategy), damping, dt, weight_decay
            )
            rotated = per_example_gradients(a @ qa, ds @ qs)
            part = (rotated.square() / lam).sum((1, 2))
        else:
            g = per_example_gradients(a, ds)
            part = (g * precondition(g, factors, name, strategy, damping, weight_decay)).sum((1, 2))
        total = total + part.double()
    return total


def self_scores(
    model: nn.Module,
    task: Task,
    train: Iterable,
    factors: Factors | None,
    *,
    strategy: str = "ekfac",
    damping: Damping = None,
    dtype: torch.dtype | None = None,
    weight_decay: float | Mapping[str, float] = 0.0,
) -> torch.Tensor:
    """Self-influence <G_z, (F_approx + damping I)^-1 G_z> of every training example, [N]."""
    _check_strategy(strategy)
    modules = task.modules(model)
    out = []
    for batch in train:
        cap = run_batch(model, task, modules, batch, dtype=dtype)
        out.append(self_influence_of_batch(cap, factors, strategy, damping, weight_decay))
    return torch.cat(out)


def per_layer(module_scores: Mapping[str, torch.Tensor], model: nn.Module) -> dict[int | str, torch.Tensor]:
    """Sum per-module scores (keyed by module name in `model`) over the modules of each decoder block of
    `model` (`steerlab.models.architectures.layers_of`); modules outside the blocks keep their name."""
    layers = layers_of(model, {name: model.get_submodule(name) for name in module_scores})
    out: dict[int | str, torch.Tensor] = {}
    for name, s in module_scores.items():
        key = layers[name]
        key = name if key is None else key
        out[key] = out[key] + s if key in out else s.clone()
    return out
