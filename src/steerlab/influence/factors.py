"""K-FAC covariance factors, their eigendecomposition and the EK-FAC eigenvalue correction.

Normalisation (per sequence). The curvature is the Fisher of the *summed* per-sequence loss averaged over
training sequences, F = E_seq[g g^T] with g the gradient of one sequence's summed loss (labels sampled from
the model: the true Fisher, which for cross-entropy equals the Gauss-Newton J^T (diag p - p p^T) J; or the
data labels: the empirical Fisher). Per tracked module:

    A = sum_tokens a a^T / (number of real tokens)        (input covariance, per token)
    S = sum_tokens ds ds^T / (number of sequences)       (output-gradient covariance, per sequence)
    K-FAC:  F ~ A (x) S,  eigenvalues lambda_A_i * lambda_S_j
    EK-FAC: F ~ (Q_A (x) Q_S) diag(Lambda) (Q_A (x) Q_S)^T, Lambda = E_seq[(Q_S^T G Q_A)^2]

so both are on the scale of one sequence's summed-loss gradient, and an explicit damping value lambda is
added to that scale (the same convention as Kronfluence's EK-FAC, whose eigenvalues are also averaged over
examples of summed losses). The default damping is 0.1 x mean(Lambda) per module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from steerlab.hooks.capture import Captured
from steerlab.influence.config import InfluenceArgumentError
from steerlab.influence.pass_cache import (
    Cache,
    cached_batch,
    first_tracked_layer,
    recording_pass,
    run_batch,
)
from steerlab.influence.tasks import Task
from steerlab.io import load_result, load_tensors, save_result, save_tensors

__all__ = [
    "Accumulator",
    "Factors",
    "FitPasses",
    "batch_seed",
    "block_sum",
    "covariance_update",
    "eigendecompose",
    "fit_covariance",
    "fit_factors",
    "fit_lambda",
    "label_draws",
    "lambda_update",
]


def batch_seed(seed: int, index: int, stage: str = "") -> int:
    """A 63-bit seed derived from the run seed, the stage and the batch index (order-independent)."""
    digest = hashlib.sha256(f"{seed}:{stage}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def label_draws(seed: int | None, index: int, stage: str, samples: int = 1) -> list[int | None]:
    """Label-sampling seeds of batch `index` in `stage`, one per draw (`samples` draws per example
    average that many Fisher samples); [None] for the data labels (empirical Fisher: one pass)."""
    if seed is None:
        return [None]
    return [batch_seed(seed, index, stage if k == 0 else f"{stage}:{k}") for k in range(samples)]


@dataclass
class Accumulator:
    """Named float64 running sums and counters; saved as safetensors, summed across processes."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        if name in self.sums:
            self.sums[name] += value.to(self.sums[name].device)
        else:
            self.sums[name] = value.clone()

    def all_reduce(self) -> None:
        from steerlab.distributed import all_reduce_sum

        for name in sorted(self.sums):
            self.sums[name] = all_reduce_sum(self.sums[name])

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        save_tensors(path, self.sums, metadata)

    @classmethod
    def load(cls, path: str | Path) -> tuple[Accumulator, dict]:
        tensors, meta = load_tensors(path)
        return cls(tensors), meta


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def covariance_update(
    acc: Accumulator, captured: Captured, n_sequences: int, mask: torch.Tensor | None
) -> None:
    """Add one batch's sum a a^T, sum ds ds^T and counts to `acc`."""
    for name, a in captured.inputs.items():
        ds = captured.grads[name]
        dt = _compute_dtype(a)
        a2 = a.reshape(-1, a.shape[-1]).to(dt)
        g2 = ds.reshape(-1, ds.shape[-1]).to(dt)
        acc.add(f"{name}/A", a2.T @ a2)
        acc.add(f"{name}/S", g2.T @ g2)
    tokens = (
        mask.sum()
        if mask is not None
        else torch.tensor(float(next(iter(captured.inputs.values())).shape[:2].numel()))
    )
    acc.add("n_tokens", torch.as_tensor(tokens, dtype=torch.float64).reshape(1))
    acc.add("n_sequences", torch.tensor([float(n_sequences)]))


def per_example_gradients(a: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """[B, out, in] = sum_t ds_t a_t^T (transient: one batch of one module)."""
    dt = _compute_dtype(a)
    return torch.bmm(ds.to(dt).transpose(1, 2), a.to(dt))


def block_sum(a: torch.Tensor, ds: torch.Tensor, grads: torch.Tensor | None = None) -> torch.Tensor:
    """sum over rows of vec G vec G^T ([p, p], row-major vec of G = sum_t ds_t a_t^T), with `grads` the
    rows' per-example gradients if already computed.

    Rows of one token whose inputs equal the previous row's (the copies of an example under
    `ClassificationTask(exact_fisher=C)`, or repeated examples) are merged first: for them
    sum_r vec G_r vec G_r^T = sum_groups S_g (x) a_g a_g^T with S_g = sum_r ds_r ds_r^T, one
    [out^2, groups] x [groups, in^2] product instead of a product over all rows (C times fewer)."""
    dt = _compute_dtype(a)
    if a.shape[1] == 1:
        a1, d1 = a[:, 0].to(dt), ds[:, 0].to(dt)
        first = torch.ones(len(a1), dtype=torch.bool, device=a1.device)
        first[1:] = (a1[1:] != a1[:-1]).any(-1)
        n_groups, (n_out, n_in) = int(first.sum()), (d1.shape[1], a1.shape[1])
        if n_groups * (n_out**2 + n_in**2) <= len(a1) * n_out * n_in:
            group = first.cumsum(0) - 1
            s = torch.zeros(n_groups, n_out * n_out, dtype=dt, device=a1.device)
            s.index_add_(0, group, (d1[:, :, None] * d1[:, None, :]).reshape(len(d1), -1))
            ag = a1[first]
            block = s.T @ (ag[:, :, None] * ag[:, None, :]).reshape(n_groups, -1)
            return block.reshape(n_out, n_out, n_in, n_in).permute(0, 2, 1, 3).reshape(n_out * n_in, -1)
    g = (per_example_gradients(a, ds) if grads is None else grads).reshape(len(a), -1).to(dt)
    return g.T @ g


def lambda_update(
    acc: Accumulator,
    captured: Captured,
    eigen: Factors,
    n_sequences: int,
    diagonal: bool,
    block_max_params: int | None = None,
    unit_max_params: int | None = None,
) -> None:
    """Add one batch's sum of squared per-sequence gradients in the K-FAC eigenbasis (and plain, if
    `diagonal`; and, for modules with at most `block_max_params` weights, bias included, the sum of the
    per-sequence gradients' outer products: the module's exact Fisher block; and, for modules with
    out x in^2 <= `unit_max_params`, the per-output-unit blocks sum_z G_z[o] G_z[o]^T, [out, in, in])."""
    for name, a in captured.inputs.items():
        ds = captured.grads[name]
        dt = _compute_dtype(a)
        qa = eigen.tensors[f"{name}/QA"].to(device=a.device, dtype=dt)
        qs = eigen.tensors[f"{name}/QS"].to(device=a.device, dtype=dt)
        rotated = per_example_gradients(a.to(dt) @ qa, ds.to(dt) @ qs)
        acc.add(f"{name}/lambda", rotated.square_().sum(0))
        small = block_max_params is not None and a.shape[-1] * ds.shape[-1] <= block_max_params
        n_in, n_out = a.shape[-1], ds.shape[-1]
        unit = unit_max_params is not None and n_out * n_in * n_in <= unit_max_params
        g = per_example_gradients(a, ds) if diagonal or unit else None
        if diagonal:
            acc.add(f"{name}/diag", (g**2).sum(0))
        if small:
            acc.add(f"{name}/block", block_sum(a, ds, g))
        if unit:
            rows = g.to(dt).permute(1, 0, 2)  # [out, B, in]
            acc.add(f"{name}/unit", rows.transpose(1, 2) @ rows)
    acc.add("n_lambda", torch.tensor([float(n_sequences)]))


FACTORS = "InfluenceFactors"  # the kind of a factors file (`steerlab.io.save_result`)


@dataclass
class Factors:
    """Per module `name/QA`, `name/lA`, `name/QS`, `name/lS` (float64 eigenpairs of A and S),
    `name/lambda` (EK-FAC eigenvalues, per sequence), optionally `name/diag` (diagonal Fisher) and, for
    modules small enough, `name/block` (the module's exact Fisher block E_seq[vec G vec G^T], [p, p] with
    vec the row-major flattening of the [out, in] gradient) and `name/unit` (per output unit o, the
    Fisher block of the weights W[o, :], E_seq[G[o] G[o]^T], [out, in, in])."""

    tensors: dict[str, torch.Tensor]
    modules: list[str]
    info: dict = field(default_factory=dict)

    def get(self, name: str, key: str) -> torch.Tensor:
        return self.tensors[f"{name}/{key}"]

    def save(self, path: str | Path, model: dict | None = None) -> None:
        """`NAME.safetensors` + `NAME.json` (`steerlab.io.save_result`; `model`: the model's identity)."""
        save_result(
            path, self.tensors, {"modules": self.modules, "info": self.info}, kind=FACTORS, model=model
        )

    @classmethod
    def load(cls, path: str | Path) -> Factors:
        tensors, meta = load_result(path, FACTORS, require_metadata=False)
        if "modules" not in meta:  # written before factors had a JSON half: metadata in the header
            meta = load_tensors(path)[1]
        return cls(tensors, meta["modules"], meta.get("info", {}))


def eigendecompose(acc: Accumulator, modules: list[str]) -> Factors:
    """Float64 eigendecomposition of the normalised covariances A and S of each module."""
    n_tokens = float(acc.sums["n_tokens"].item())
    n_seq = float(acc.sums["n_sequences"].item())
    tensors = {}
    for name in modules:
        A = acc.sums[f"{name}/A"].double() / n_tokens
        S = acc.sums[f"{name}/S"].double() / n_seq
        tensors[f"{name}/lA"], tensors[f"{name}/QA"] = torch.linalg.eigh((A + A.T) / 2)
        tensors[f"{name}/lS"], tensors[f"{name}/QS"] = torch.linalg.eigh((S + S.T) / 2)
    return Factors(tensors, list(modules), {"n_tokens": n_tokens, "n_sequences": n_seq})


@dataclass(frozen=True)
class FitPasses:
    """What every fitting pass over a batch shares: model, task, tracked modules, label draws (`seed`
    None: the data labels, once; otherwise `samples` sampled draws), capture dtype and pass cache (with
    `layer`, the first tracked layer, where the covariance pass records it)."""

    model: nn.Module
    task: Task
    modules: Mapping[str, nn.Module]
    seed: int | None = 0
    samples: int = 1
    dtype: torch.dtype | None = None
    cache: Cache | None = None
    layer: int | None = None

    @classmethod
    def of(cls, model: nn.Module, task: Task, *, cache: Cache | None = None, **settings) -> FitPasses:
        modules = task.modules(model)
        layer = first_tracked_layer(model, modules) if cache is not None else None
        return cls(model, task, modules, cache=cache, layer=layer, **settings)

    def __post_init__(self) -> None:
        if self.seed is None and self.samples != 1:
            raise InfluenceArgumentError(
                f"samples={self.samples}: several label draws need sampled labels (a seed); "
                "the data labels (seed=None, empirical Fisher) are the same in every draw"
            )

    def _run(self, batch, sample: int | None) -> Captured:
        return run_batch(self.model, self.task, self.modules, batch, sample_seed=sample, dtype=self.dtype)

    def covariance(self, acc: Accumulator, batch, index: int) -> None:
        """Add batch `index` to the covariance sums. With a cache and a layer, the first draw stores the
        batch's entry and the other draws start from it."""
        for k, sample in enumerate(label_draws(self.seed, index, "covariance", self.samples)):
            if k == 0 and self.cache is not None and self.layer is not None:
                cap, self.cache[index] = recording_pass(
                    self.model,
                    self.task,
                    self.modules,
                    batch,
                    self.layer,
                    sample_seed=sample,
                    dtype=self.dtype,
                )
            else:
                cap = self._run(cached_batch(batch, self.cache, index), sample)
            covariance_update(acc, cap, self.task.batch_size(batch), self.task.token_mask(batch))

    def eigenvalues(
        self,
        acc: Accumulator,
        batch,
        index: int,
        eigen: Factors,
        diagonal: bool = False,
        block_max_params: int | None = None,
        unit_max_params: int | None = None,
    ) -> None:
        """Add batch `index` to the EK-FAC eigenvalue sums (and the diagonal Fisher's, if `diagonal`, and
        the exact Fisher blocks of modules with at most `block_max_params` weights), starting from the
        batch's cache entry where there is one."""
        batch = cached_batch(batch, self.cache, index)
        for sample in label_draws(self.seed, index, "lambda", self.samples):
            cap = self._run(batch, sample)
            n = self.task.batch_size(batch)
            lambda_update(acc, cap, eigen, n, diagonal, block_max_params, unit_max_params)


def fit_covariance(
    model: nn.Module,
    task: Task,
    data: Iterable,
    *,
    seed: int | None = 0,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    cache: Cache | None = None,
    samples: int = 1,
) -> Accumulator:
    """Stream `data` (an iterable of batches) once, accumulating A and S. `seed=None`: empirical Fisher;
    otherwise `samples` label draws per example. With a `cache` (e.g. an empty dict), also record each
    batch's pass-cache entry (see `pass_cache`), so that later passes start at the first tracked layer."""
    from tqdm.auto import tqdm

    passes = FitPasses.of(model, task, seed=seed, samples=samples, dtype=dtype, cache=cache)
    acc = Accumulator()
    for index, batch in tqdm(enumerate(data), desc="covariance", disable=not progress):
        passes.covariance(acc, batch, index)
    return acc


def fit_lambda(
    model: nn.Module,
    task: Task,
    data: Iterable,
    eigen: Factors,
    *,
    seed: int | None = 0,
    dtype: torch.dtype | None = None,
    diagonal: bool = False,
    progress: bool = False,
    samples: int = 1,
    cache: Cache | None = None,
    block_max_params: int | None = None,
    unit_max_params: int | None = None,
) -> Accumulator:
    """Stream `data` once more, accumulating the EK-FAC eigenvalue correction (`samples` label draws per
    example unless `seed=None`), starting each batch from its `cache` entry where there is one; also
    the exact Fisher block of every module with at most `block_max_params` weights (bias included) and
    the per-unit blocks of every module with out x in^2 <= `unit_max_params`."""
    from tqdm.auto import tqdm

    passes = FitPasses(model, task, task.modules(model), seed, samples, dtype, cache)
    acc = Accumulator()
    for index, batch in tqdm(enumerate(data), desc="eigenvalues", disable=not progress):
        passes.eigenvalues(acc, batch, index, eigen, diagonal, block_max_params, unit_max_params)
    return acc


def finish_lambda(eigen: Factors, acc: Accumulator) -> Factors:
    """Attach the averaged EK-FAC eigenvalues (and diagonal, and exact blocks) to the eigendecomposition."""
    n = float(acc.sums["n_lambda"].item())
    tensors = dict(eigen.tensors)
    for name in eigen.modules:
        tensors[f"{name}/lambda"] = acc.sums[f"{name}/lambda"] / n
        for key in ("diag", "block", "unit"):
            if f"{name}/{key}" in acc.sums:
                tensors[f"{name}/{key}"] = acc.sums[f"{name}/{key}"] / n
    return Factors(tensors, eigen.modules, {**eigen.info, "n_lambda": n})


def fit_factors(
    model: nn.Module,
    task: Task,
    data,
    *,
    seed: int | None = 0,
    dtype: torch.dtype | None = None,
    diagonal: bool = False,
    progress: bool = False,
    samples: int = 1,
    block_max_params: int | None = None,
    unit_max_params: int | None = None,
) -> Factors:
    """Covariances -> eigendecomposition -> EK-FAC eigenvalues, in memory (`data` is iterated twice).
    `seed=None` uses the data labels (empirical Fisher); otherwise labels are sampled from the model,
    `samples` draws per example (more draws: a less noisy true Fisher, at that many passes).
    `block_max_params`: modules with at most this many weights (out x in, bias included) also get their
    exact Fisher block (for the "block" strategy; p x p float64 each, accumulated in the second pass).
    `unit_max_params`: modules with out x in^2 at most this also get their per-output-unit Fisher blocks
    (for the "unit" strategy; [out, in, in] float64 each)."""
    modules = list(task.modules(model))
    common = {"seed": seed, "dtype": dtype, "progress": progress, "samples": samples}
    eigen = eigendecompose(fit_covariance(model, task, data, **common), modules)
    lam = fit_lambda(
        model,
        task,
        data,
        eigen,
        diagonal=diagonal,
        block_max_params=block_max_params,
        unit_max_params=unit_max_params,
        **common,
    )
    return finish_lambda(eigen, lam)
