"""Exact Hessian- and Gauss-Newton-vector products of a dataset loss w.r.t. a parameter subset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from steerlab import distributed
from steerlab.hessian.params import block_slices, flatten, select_params, unflatten
from steerlab.hessian.tasks import LossTask
from steerlab.hooks.modes import curvature_mode

Kind = Literal["hessian", "ggn"]


class CurvatureOperator:
    """The symmetric operator v -> H v (or G v) of the weighted-mean dataset loss, on flat float64 vectors.

    Products are exact (double backward through the model), summed over `batches` in float64.
    `params` maps names to parameters of `model` (see `select_params`); other parameters are held fixed.
    With `cache_graph=True` the first-order graph of every batch is built once and kept, so each product
    costs one backward pass per batch instead of a forward and two backwards (memory: one graph per batch).
    `n_products` counts full-dataset products, the unit every estimator reports its cost in.
    With `shard=True` under torchrun, each process works on its share of the batches
    (`steerlab.distributed.shard`) and every product, gradient and loss is summed over the processes, so
    each one gets the full result (one process: the same as `shard=False`).
    """

    def __init__(
        self,
        model: nn.Module,
        task: LossTask,
        batches: Sequence[Any],
        params: dict[str, nn.Parameter] | None = None,
        kind: Kind = "hessian",
        cache_graph: bool = False,
        shard: bool = False,
    ) -> None:
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"kind must be 'hessian' or 'ggn', not {kind!r}")
        if not batches:
            raise ValueError("no batches")
        self.model, self.task, self.batches, self.kind = model, task, list(batches), kind
        self.params = dict(params) if params is not None else select_params(model)
        self.names = list(self.params)
        self.tensors = list(self.params.values())
        self.slices = block_slices(self.params)
        self.dim = sum(p.numel() for p in self.tensors)
        weights = [float(task.weight(b)) for b in self.batches]
        total = sum(weights)
        if total <= 0:
            raise ValueError("batches carry no weight (no samples / no target tokens)")
        self.fractions = [w / total for w in weights]
        self.shard = shard
        self.local = distributed.shard(range(len(self.batches))) if shard else list(range(len(self.batches)))
        self.cache_graph = cache_graph
        self._cache: dict[int, tuple] = {}
        self.n_products = 0
        self.device = self.tensors[0].device
        self.dtype = self.tensors[0].dtype

    # ----------------------------------------------------------------- graphs
    def _grad_graph(self, batch: Any) -> tuple:
        """Per-batch quantities with a live graph: (grads,) for Hessian, (outputs, dloss/doutputs, J^T u, u) for GGN."""
        with torch.enable_grad():
            if self.kind == "hessian":
                loss = self.task(self.model, batch)
                grads = torch.autograd.grad(loss, self.tensors, create_graph=True, allow_unused=True)
                return (grads,)
            outputs = self.task.forward(self.model, batch)
            loss = self.task.loss(outputs, batch)
            (g_out,) = torch.autograd.grad(loss, outputs, create_graph=True)
            dummy = torch.zeros_like(outputs, requires_grad=True)
            jt_dummy = torch.autograd.grad(
                outputs, self.tensors, grad_outputs=dummy, create_graph=True, allow_unused=True
            )
            return (outputs, g_out, jt_dummy, dummy)

    def _graph(self, i: int) -> tuple:
        if not self.cache_graph:
            return self._grad_graph(self.batches[i])
        if i not in self._cache:
            self._cache[i] = self._grad_graph(self.batches[i])
        return self._cache[i]

    def _batch_product(self, i: int, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        graph = self._graph(i)
        keep = self.cache_graph
        if self.kind == "hessian":
            (grads,) = graph
            pairs = [(g, v) for g, v in zip(grads, vs) if g is not None]
            dot = sum((g * v).sum() for g, v in pairs)
            out = torch.autograd.grad(dot, self.tensors, retain_graph=keep, allow_unused=True)
        else:
            outputs, g_out, jt_dummy, dummy = graph
            pairs = [(g, v) for g, v in zip(jt_dummy, vs) if g is not None]
            dot = sum((g * v).sum() for g, v in pairs)
            (jv,) = torch.autograd.grad(dot, dummy, retain_graph=True)
            (hjv,) = torch.autograd.grad(g_out, outputs, grad_outputs=jv.detach(), retain_graph=True)
            out = torch.autograd.grad(
                outputs, self.tensors, grad_outputs=hjv.detach(), retain_graph=keep, allow_unused=True
            )
        return [torch.zeros_like(p) if o is None else o for o, p in zip(out, self.tensors)]

    # --------------------------------------------------------------- products
    def matvec(self, v: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(H or G) @ v for a flat vector of length `dim`; returns float64 on the parameters' device."""
        v = torch.as_tensor(v).to(device=self.device, dtype=torch.float64).reshape(-1)
        if v.numel() != self.dim:
            raise ValueError(f"vector has {v.numel()} entries, operator dimension is {self.dim}")
        vs = unflatten(v, self.tensors)
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        with curvature_mode(self.model):
            for i in self.local:
                total += self.fractions[i] * flatten(self._batch_product(i, vs))
        self.n_products += 1
        return self._reduce(total)

    def _reduce(self, total: torch.Tensor) -> torch.Tensor:
        """The sum over processes of each one's partial result (itself unless sharded)."""
        return distributed.all_reduce_sum(total) if self.shard else total

    def matmat(self, vs: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Apply the operator to each column of `vs` (dim x m)."""
        cols = [
            self.matvec(vs[:, j]) for j in tqdm(range(vs.shape[1]), disable=not progress, desc="products")
        ]
        return torch.stack(cols, dim=1)

    def quadratic(self, v: torch.Tensor) -> float:
        """v^T (H or G) v."""
        v = torch.as_tensor(v, dtype=torch.float64, device=self.device)
        return float(v @ self.matvec(v))

    def quadratics(self, vectors: torch.Tensor) -> np.ndarray:
        """v^T (H or G) v for every row v of `vectors` (k x dim)."""
        return np.array([self.quadratic(v) for v in vectors])

    def gradient(self) -> torch.Tensor:
        """Flat float64 gradient of the dataset loss."""
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        with curvature_mode(self.model), torch.enable_grad():
            for i in self.local:
                loss = self.task(self.model, self.batches[i])
                grads = torch.autograd.grad(loss, self.tensors, allow_unused=True)
                total += self.fractions[i] * flatten(
                    [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.tensors)]
                )
        return self._reduce(total)

    def loss(self) -> float:
        """The weighted-mean dataset loss."""
        with curvature_mode(self.model), torch.no_grad():
            part = sum(self.fractions[i] * float(self.task(self.model, self.batches[i])) for i in self.local)
        return float(self._reduce(torch.tensor([float(part)], dtype=torch.float64))[0])

    def as_linear_operator(self):
        """A scipy LinearOperator view (float64), e.g. for `scipy.sparse.linalg.eigsh`."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(
            (self.dim, self.dim), matvec=lambda x: self.matvec(x).cpu().numpy(), dtype=np.float64
        )

    def clear_cache(self) -> None:
        self._cache.clear()

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "task": self.task.name,
            "dim": self.dim,
            "n_batches": len(self.batches),
            "processes": distributed.world_size() if self.shard else 1,
            "params": {n: list(p.shape) for n, p in self.params.items()},
        }


def dense_matrix(op: CurvatureOperator, progress: bool = True, max_dim: int = 20000) -> torch.Tensor:
    """The exact dense (dim x dim) float64 matrix, built one column (one product) at a time, symmetrised.

    Peak memory is the output matrix plus one column; meant as ground truth for small models, so it
    refuses dim > `max_dim` (raise it to force).
    """
    n = op.dim
    if n > max_dim:
        raise ValueError(
            f"dense matrix of dimension {n} would need {8 * n * n / 2**30:.1f} GiB; raise max_dim to force"
        )
    out = torch.empty(n, n, dtype=torch.float64)
    e = torch.zeros(n, dtype=torch.float64)
    for j in tqdm(range(n), disable=not progress, desc=f"dense {op.kind}"):
        e[j] = 1.0
        out[:, j] = op.matvec(e).cpu()
        e[j] = 0.0
    return (out + out.T) / 2
