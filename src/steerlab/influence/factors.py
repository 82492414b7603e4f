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

from steerlab.hooks.capture import Captured, capture, module_shape
from steerlab.hooks.modes import no_param_grads
from steerlab.influence.tasks import Task
from steerlab.io import load_tensors, save_tensors
from steerlab.memory import release_free_memory

__all__ = [
    "Accumulator",
    "Factors",
    "batch_seed",
    "covariance_update",
    "eigendecompose",
    "fit_covariance",
    "fit_factors",
    "fit_lambda",
    "label_draws",
    "lambda_update",
    "run_batch",
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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_batch(
    model: nn.Module,
    task: Task,
    modules: Mapping[str, nn.Module],
    batch,
    *,
    query: bool = False,
    sample_seed: int | None = None,
    dtype: torch.dtype | None = None,
    head_grads: list | None = None,
) -> Captured:
    """One forward/backward of the training loss (or the query loss), capturing tracked modules.
    With a list `head_grads` (and a task that supports it), also append the data-label loss's gradient
    at the output head's input (see `prefix`; None when the task cannot record it)."""
    release_free_memory(every=4)  # earlier batches' transient buffers (see steerlab.memory)
    batch = to_device(batch, _device(model))
    generator = None
    if sample_seed is not None and not query:
        generator = torch.Generator(device=_device(model)).manual_seed(sample_seed)
    record = head_grads is not None and hasattr(task, "train_loss_and_head_gradient") and not query
    if record and getattr(model, "get_output_embeddings", lambda: None)() in modules.values():
        record = False  # the head itself is tracked: it must run in every pass
    with no_param_grads(model), capture(modules, task.token_mask(batch), dtype) as captured:
        if query:
            loss = task.query_loss(model, batch)
        elif record:
            loss, head_grad = task.train_loss_and_head_gradient(model, batch, generator)
        else:
            loss = task.train_loss(model, batch, generator)
        loss.backward()
    captured.check_complete(modules)
    if head_grads is not None:
        head_grads.append(head_grad if record else None)
    return captured


def to_device(batch, device: torch.device):
    """Move the tensors of a dict / tuple / list batch to `device` (a no-op when already there)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


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


def lambda_update(
    acc: Accumulator, captured: Captured, eigen: Factors, n_sequences: int, diagonal: bool
) -> None:
    """Add one batch's sum of squared per-sequence gradients in the K-FAC eigenbasis (and plain, if `diagonal`)."""
    for name, a in captured.inputs.items():
        ds = captured.grads[name]
        dt = _compute_dtype(a)
        qa = eigen.tensors[f"{name}/QA"].to(device=a.device, dtype=dt)
        qs = eigen.tensors[f"{name}/QS"].to(device=a.device, dtype=dt)
        rotated = per_example_gradients(a.to(dt) @ qa, ds.to(dt) @ qs)
        acc.add(f"{name}/lambda", rotated.square_().sum(0))
        if diagonal:
            acc.add(f"{name}/diag", (per_example_gradients(a, ds) ** 2).sum(0))
    acc.add("n_lambda", torch.tensor([float(n_sequences)]))


@dataclass
class Factors:
    """Per module `name/QA`, `name/lA`, `name/QS`, `name/lS` (float64 eigenpairs of A and S),
    `name/lambda` (EK-FAC eigenvalues, per sequence) and optionally `name/diag` (diagonal Fisher)."""

    tensors: dict[str, torch.Tensor]
    modules: list[str]
    info: dict = field(default_factory=dict)

    def get(self, name: str, key: str) -> torch.Tensor:
        return self.tensors[f"{name}/{key}"]

    def save(self, path: str | Path) -> None:
        save_tensors(path, self.tensors, {"modules": self.modules, "info": self.info})

    @classmethod
    def load(cls, path: str | Path) -> Factors:
        tensors, meta = load_tensors(path)
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


def _batches(data: Iterable) -> Iterable[tuple[int, object]]:
    return enumerate(data)


def fit_covariance(
    model: nn.Module,
    task: Task,
    data: Iterable,
    *,
    seed: int | None = 0,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    prefix_cache: dict | None = None,
    samples: int = 1,
) -> Accumulator:
    """Stream `data` (an iterable of batches) once, accumulating A and S. `seed=None`: empirical Fisher;
    otherwise `samples` label draws per example. With a dict `prefix_cache`, also record {batch index:
    hidden states entering the first tracked layer, head-input gradient}; merge them into the batches
    (`{**batch, **prefix_cache[i]}`) so that later passes start there."""
    from tqdm.auto import tqdm

    modules = task.modules(model)
    acc = Accumulator()
    layer = None
    if prefix_cache is not None:
        from steerlab.influence.prefix import first_tracked_layer

        layer = first_tracked_layer(modules)
    for index, batch in tqdm(_batches(data), desc="covariance", disable=not progress):
        for k, sample in enumerate(label_draws(seed, index, "covariance", samples)):
            if k == 0:
                cap = run_batch_recording(
                    model, task, modules, batch, layer, prefix_cache, index, sample, dtype
                )
            else:
                cached = {**batch, **prefix_cache.get(index, {})} if prefix_cache is not None else batch
                cap = run_batch(model, task, modules, cached, sample_seed=sample, dtype=dtype)
            covariance_update(acc, cap, task.batch_size(batch), task.token_mask(batch))
    return acc


def run_batch_recording(model, task, modules, batch, layer, cache, index, sample, dtype) -> Captured:
    """`run_batch` that also stores in `cache[index]` the hidden states entering block `layer` and the
    data-label gradient at the head's input (the pass cache, see `prefix`)."""
    if layer is None or cache is None:
        return run_batch(model, task, modules, batch, sample_seed=sample, dtype=dtype)
    from steerlab.hooks import record_block_input

    head_grads: list = []
    with record_block_input(model, layer) as seen:
        cap = run_batch(model, task, modules, batch, sample_seed=sample, dtype=dtype, head_grads=head_grads)
    cache[index] = {"prefix_hidden": seen[0], "prefix_layer": torch.tensor(layer)}
    if head_grads[0] is not None:
        cache[index]["head_grad"] = head_grads[0]
    return cap


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
) -> Accumulator:
    """Stream `data` once more, accumulating the EK-FAC eigenvalue correction (`samples` label draws per
    example unless `seed=None`)."""
    from tqdm.auto import tqdm

    modules = task.modules(model)
    acc = Accumulator()
    for index, batch in tqdm(_batches(data), desc="eigenvalues", disable=not progress):
        for sample in label_draws(seed, index, "lambda", samples):
            cap = run_batch(model, task, modules, batch, sample_seed=sample, dtype=dtype)
            lambda_update(acc, cap, eigen, task.batch_size(batch), diagonal)
    return acc


def finish_lambda(eigen: Factors, acc: Accumulator) -> Factors:
    """Attach the averaged EK-FAC eigenvalues (and diagonal) to the eigendecomposition."""
    n = float(acc.sums["n_lambda"].item())
    tensors = dict(eigen.tensors)
    for name in eigen.modules:
        tensors[f"{name}/lambda"] = acc.sums[f"{name}/lambda"] / n
        if f"{name}/diag" in acc.sums:
            tensors[f"{name}/diag"] = acc.sums[f"{name}/diag"] / n
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
) -> Factors:
    """Covariances -> eigendecomposition -> EK-FAC eigenvalues, in memory (`data` is iterated twice).
    `seed=None` uses the data labels (empirical Fisher); otherwise labels are sampled from the model,
    `samples` draws per example (more draws: a less noisy true Fisher, at that many passes)."""
    modules = list(task.modules(model))
    common = {"seed": seed, "dtype": dtype, "progress": progress, "samples": samples}
    eigen = eigendecompose(fit_covariance(model, task, data, **common), modules)
    lam = fit_lambda(model, task, data, eigen, diagonal=diagonal, **common)
    return finish_lambda(eigen, lam)


def module_shapes(model: nn.Module, task: Task) -> dict[str, tuple[int, int]]:
    return {n: module_shape(m) for n, m in task.modules(model).items()}
