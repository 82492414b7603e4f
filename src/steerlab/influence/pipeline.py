"""Streaming, resumable, distributed influence runs: fit factors, then score queries against a corpus.

    run = Path("runs/smollm2")
    factors = fit(run, model, task, train)                # covariance -> eigen -> lambda
    result = score(run, model, task, train, queries)      # queries -> scores (running top-k per query)

Each stage is stored under `run/<stage>/` (safetensors + JSON arguments), skipped when done, refused
when its saved arguments differ, and resumed from its checkpoint when interrupted (see `stages`).
Under `torchrun`, batches are sharded across processes (batch i on rank i % world); covariance and
eigenvalue sums are all-reduced, running top-k states merged; rank 0 writes results.
The training corpus is streamed batch by batch: per-sequence gradients and the [queries x train]
score matrix are never held (only the top/bottom-k per query and an optional strided sample of scores).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from steerlab.distributed import barrier, is_main, rank, shard, world_size
from steerlab.influence.data import lm_batch
from steerlab.influence.factors import (
    Accumulator,
    Factors,
    FitPasses,
    eigendecompose,
    finish_lambda,
)
from steerlab.influence.full_scores import ScoreMatrix
from steerlab.influence.pass_cache import (
    DiskCache,
    cached_batch,
    cached_rows,
    fitted_cache,
    run_batch,
)
from steerlab.influence.scores import (
    Preconditioned,
    preconditioned_queries,
    query_gradients,
    score_captured,
    self_influence_of_batch,
)
from steerlab.influence.stages import check_stage, checkpoint_path, stream_stage
from steerlab.influence.tasks import Task
from steerlab.influence.topk import merge_topk, update_topk
from steerlab.io import load_result, load_tensors, read_json, result_paths, save_result, save_tensors
from steerlab.models.architectures import layers_of

__all__ = ["BlockBatches", "TensorBatches", "fit", "score", "self_influence", "tensor_hash"]


SCORES, SELF = "InfluenceScores", "SelfInfluence"  # kinds of the result files (`steerlab.io.save_result`)


def tensor_hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _SubsetBatches(Sequence):
    """Batches of `batch_size` consecutive entries of `self.subset` (example indices)."""

    subset: list[int]
    batch_size: int

    def __len__(self) -> int:
        return (len(self.subset) + self.batch_size - 1) // self.batch_size

    def indices(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return torch.tensor(self.subset[i * self.batch_size : (i + 1) * self.batch_size])


class BlockBatches(_SubsetBatches):
    """Batches of token blocks for `LanguageModelTask` (loss on every next token), optionally a subset.
    `blocks`: [N, L] token ids (rows may be ragged via `lengths`)."""

    def __init__(
        self,
        blocks: torch.Tensor,
        batch_size: int,
        lengths: torch.Tensor | None = None,
        subset: Sequence[int] | None = None,
        pad_id: int = 0,
    ):
        self.blocks, self.batch_size, self.pad_id = blocks, batch_size, pad_id
        self.lengths = lengths if lengths is not None else torch.full((len(blocks),), blocks.shape[1])
        self.subset = list(range(len(blocks))) if subset is None else [int(i) for i in subset]

    def sequences(self, idx: Sequence[int]) -> list[list[int]]:
        return [self.blocks[j, : int(self.lengths[j])].tolist() for j in idx]

    def __getitem__(self, i: int):
        return lm_batch(self.sequences(self.indices(i).tolist()), pad_id=self.pad_id)

    @property
    def n_examples(self) -> int:
        return len(self.blocks)

    def with_subset(self, subset: Sequence[int]) -> BlockBatches:
        return BlockBatches(self.blocks, self.batch_size, self.lengths, subset, self.pad_id)

    def describe(self) -> dict:
        return {
            "n": len(self.blocks),
            "batch_size": self.batch_size,
            "hash": tensor_hash(self.blocks, self.lengths),
        }


class TensorBatches(_SubsetBatches):
    """Batches `(x[idx], y[idx])` of tensors for `ClassificationTask`, optionally a subset."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, subset: Sequence[int] | None = None
    ):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.subset = list(range(len(x))) if subset is None else [int(i) for i in subset]

    def __getitem__(self, i: int):
        idx = self.indices(i)
        return self.x[idx], self.y[idx]

    def with_subset(self, subset: Sequence[int]) -> TensorBatches:
        return TensorBatches(self.x, self.y, self.batch_size, subset)

    @property
    def n_examples(self) -> int:
        return len(self.x)

    def describe(self) -> dict:
        return {"n": len(self.x), "batch_size": self.batch_size, "hash": tensor_hash(self.x, self.y)}


def _complete(path: Path) -> bool:
    """Whether a result written with `save_result` is complete (its JSON half is written last)."""
    return result_paths(path)[1].exists()


def _describe(train) -> dict:
    return train.describe() if hasattr(train, "describe") else {"n_batches": len(train)}


def _accumulate(
    run_dir: Path, name: str, train, step_fn, checkpoint_every: int, progress: bool
) -> Accumulator:
    """Stream this process's shard of batches into float64 sums, all-reduce, and store the result."""
    result = run_dir / name / "result.safetensors"
    ckpt = checkpoint_path(run_dir, name, rank(), world_size())

    def step(state, i):
        step_fn(Accumulator(state), i)

    state = stream_stage(ckpt, name, shard(range(len(train))), step, checkpoint_every, progress)
    acc = Accumulator(state)
    acc.all_reduce()
    if is_main():
        acc.save(result)
    barrier()
    return acc


def fit(
    run_dir: str | Path,
    model: nn.Module,
    task: Task,
    train,
    *,
    seed: int | None = 0,
    dtype: torch.dtype | None = None,
    diagonal: bool = False,
    checkpoint_every: int = 8,
    progress: bool = False,
    extra_args: dict | None = None,
    prefix_cache: bool = False,
    samples: int = 1,
    model_info: dict | None = None,
    block_max_params: int | None = None,
    unit_max_params: int | None = None,
) -> Factors:
    """Fit EK-FAC factors over the indexable batch source `train`, stage by stage (see module docs).
    `seed=None`: empirical Fisher (data labels); otherwise labels sampled per batch from the model,
    `samples` draws per example (averaged: a less noisy true Fisher, at `samples` passes).
    `prefix_cache`: the covariance pass stores the hidden states entering the first tracked layer
    (`run/prefix/`), and later passes start there (see `pass_cache`). `model_info`: the model's identity
    (`LoadedModel.info.to_dict()`), recorded with the factors. `block_max_params`: modules with at most
    this many weights also get their exact Fisher block (the "block" strategy); `unit_max_params`: modules
    with out x in^2 at most this, their per-output-unit blocks (the "unit" strategy)."""
    run_dir = Path(run_dir)
    modules = task.modules(model)
    args = {
        "train": _describe(train),
        "modules": list(modules),
        "seed": seed,
        "dtype": str(dtype),
        "world_size": world_size(),
        **(extra_args or {}),
    }

    if prefix_cache:
        args["prefix_cache"] = True
    if samples != 1 and seed is not None:
        args["samples"] = samples
    cache = DiskCache.of_run(run_dir) if prefix_cache else None
    passes = FitPasses.of(model, task, seed=seed, samples=samples, dtype=dtype, cache=cache)
    if not check_stage(run_dir, "covariance", args):

        def cov_step(acc: Accumulator, i: int) -> None:
            passes.covariance(acc, train[i], i)

        _accumulate(run_dir, "covariance", train, cov_step, checkpoint_every, progress)
    cov, _ = Accumulator.load(run_dir / "covariance" / "result.safetensors")

    eigen_path = run_dir / "eigen" / "result.safetensors"
    done = check_stage(run_dir, "eigen", args) and _complete(eigen_path)
    barrier()  # every process decides before the main one writes
    if not done:
        if is_main():
            eigendecompose(cov, list(modules)).save(eigen_path)
        barrier()
    eigen = Factors.load(eigen_path)

    lam_args = {**args, "diagonal": diagonal}
    if block_max_params is not None:
        lam_args["block_max_params"] = block_max_params
    if unit_max_params is not None:
        lam_args["unit_max_params"] = unit_max_params
    if not check_stage(run_dir, "lambda", lam_args):

        def lam_step(acc: Accumulator, i: int) -> None:
            passes.eigenvalues(acc, train[i], i, eigen, diagonal, block_max_params, unit_max_params)

        _accumulate(run_dir, "lambda", train, lam_step, checkpoint_every, progress)
    factors_path = run_dir / "lambda" / "factors.safetensors"
    barrier()
    missing = not _complete(factors_path)
    barrier()
    if missing:
        if is_main():
            lam, _ = Accumulator.load(run_dir / "lambda" / "result.safetensors")
            finish_lambda(eigen, lam).save(factors_path, model=model_info)
        barrier()
    return Factors.load(factors_path)


def score(
    run_dir: str | Path,
    model: nn.Module,
    task: Task,
    train,
    queries: Sequence,
    *,
    strategy: str = "ekfac",
    damping: float | None = None,
    rank_: int | None = None,
    top_k: int = 10,
    candidates: torch.Tensor | None = None,
    sample_stride: int = 1,
    dtype: torch.dtype | None = None,
    checkpoint_every: int = 8,
    progress: bool = False,
    name: str = "scores",
    model_info: dict | None = None,
    weight_decay: float = 0.0,
    full_scores: bool = False,
) -> dict[str, torch.Tensor]:
    """Score every query against the training batches (an indexable source with `indices(i)`, like
    `BlockBatches` or `TensorBatches`) (or, with `candidates` [Q, m], against each query's
    candidates only), keeping per query the top-k and bottom-k scores and indices, the summed |score| per
    layer, and the scores of every `sample_stride`-th training example (for histograms). The result is
    `run/<name>/result` (a `save_result` file of kind InfluenceScores; `model_info`: the model's identity).
    `weight_decay`: added to the damping (see `scores.damping_for`). `full_scores`: also write every score,
    streamed batch by batch into `run/<name>/full.safetensors` (tensor "scores", [train, queries];
    see `full_scores.ScoreMatrix`)."""
    run_dir = Path(run_dir)
    fit_args = read_json(run_dir / "lambda" / "args.json") if strategy != "identity" else {}
    qids = [q["input_ids"] for q in queries] if isinstance(queries[0], dict) else [q[0] for q in queries]
    qargs = {
        "fit": fit_args,
        "queries": tensor_hash(*qids),
        "strategy": strategy,
        "damping": damping,
        "rank": rank_,
        "dtype": str(dtype),
        "world_size": world_size(),
    }
    if weight_decay:
        qargs["weight_decay"] = weight_decay
    qstage = f"{name}_queries"
    if not check_stage(run_dir, qstage, qargs):
        if is_main():
            factors = (
                Factors.load(run_dir / "lambda" / "factors.safetensors") if strategy != "identity" else None
            )
            pre = preconditioned_queries(
                query_gradients(model, task, queries, dtype=dtype, factored=True),
                factors,
                strategy,
                damping,
                rank_,
                consume=True,
                weight_decay=weight_decay,
            )
            save_tensors(run_dir / qstage / "result.safetensors", pre.tensors())
        barrier()
    pre = Preconditioned.from_tensors(load_tensors(run_dir / qstage / "result.safetensors")[0])
    n_queries = pre.num_queries

    sargs = {
        **qargs,
        "train": _describe(train),
        "top_k": top_k,
        "sample_stride": sample_stride,
        "candidates": None if candidates is None else tensor_hash(candidates),
    }
    if full_scores:
        sargs["full_scores"] = True
    result_path = run_dir / name / "result.safetensors"
    if check_stage(run_dir, name, sargs) and _complete(result_path):
        return load_result(result_path, SCORES)[0]

    source = train
    allowed = None
    if candidates is not None:
        source = train.with_subset(sorted(set(candidates.reshape(-1).tolist())))
        allowed = torch.zeros(n_queries, train.n_examples, dtype=torch.bool)
        allowed.scatter_(1, candidates.long(), True)
    cache = fitted_cache(run_dir, fit_args, _describe(train))
    modules = {n: m for n, m in task.modules(model).items() if n in pre.modules}
    layer_index = {n: -1 if v is None else v for n, v in layers_of(model, modules).items()}
    layers = sorted(set(layer_index.values()))
    matrix = None
    if full_scores:
        if candidates is not None:
            raise ValueError("full_scores: not with candidates (a prefiltered run scores a subset)")
        matrix = ScoreMatrix(run_dir / name / "full.safetensors", train.n_examples, n_queries)
        if is_main():
            matrix.create()
        barrier()

    def step(state: dict[str, torch.Tensor], i: int) -> None:
        idx = source.indices(i)
        if candidates is None:
            batch = cached_batch(source[i], cache, i)
        else:  # a subset's batch i is not training batch i: gather the rows
            batch = cached_rows(source[i], cache, idx, train.batch_size)
        cap = run_batch(model, task, modules, batch, dtype=dtype)
        per_module, _ = score_captured(cap, pre)
        total = sum(per_module.values()).double().cpu()
        if allowed is not None:
            total = total.masked_fill(~allowed[:, idx], float("nan"))
        update_topk(state, total, idx, top_k)
        if matrix is not None:
            matrix.write(idx, total.T)
        layer_abs = torch.zeros(n_queries, len(layers), dtype=torch.float64)
        for n, s in per_module.items():
            s = s.double().abs().cpu()
            if allowed is not None:
                s = s.masked_fill(~allowed[:, idx], 0.0)
            layer_abs[:, layers.index(layer_index[n])] += s.sum(1)
        state["layer_abs"] = state["layer_abs"] + layer_abs if "layer_abs" in state else layer_abs
        keep = idx % sample_stride == 0
        if keep.any():
            _append(state, "sample_index", idx[keep], 0)
            _append(state, "sample_values", total[:, keep], 1)

    states = _stream_shards(run_dir, name, len(source), step, checkpoint_every, progress)
    if is_main():
        out = merge_topk(states, top_k)
        out["layer_abs"] = sum(s["layer_abs"] for s in states)
        out["layers"] = torch.tensor(layers)
        if any("sample_index" in s for s in states):
            out["sample_index"], out["sample_values"] = _by_index(states, "sample_index", "sample_values", 1)
        if matrix is not None:
            matrix.finish()
        save_result(result_path, out, {"arguments": sargs}, kind=SCORES, model=model_info)
    barrier()
    return load_result(result_path, SCORES)[0]


def _stream_shards(
    run_dir: Path, name: str, n_batches: int, step, checkpoint_every: int, progress: bool
) -> list[dict[str, torch.Tensor]]:
    """Run `step` over this process's shard of batches (checkpointed, resumable); on the main process
    return every process's final state (those that saw batches), elsewhere []."""
    stream_stage(
        checkpoint_path(run_dir, name, rank(), world_size()),
        name,
        shard(range(n_batches)),
        step,
        checkpoint_every,
        progress,
    )
    barrier()
    if not is_main():
        return []
    states = [load_tensors(checkpoint_path(run_dir, name, r, world_size()))[0] for r in range(world_size())]
    return [state for state in states if state]


def _append(state: dict[str, torch.Tensor], key: str, value: torch.Tensor, dim: int) -> None:
    state[key] = torch.cat([state[key], value], dim) if key in state else value.clone()


def _by_index(
    states: list[dict], index_key: str, value_key: str, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the indexed values of several processes' states, sorted by training index."""
    present = [s for s in states if index_key in s]
    index = torch.cat([s[index_key] for s in present])
    values = torch.cat([s[value_key] for s in present], dim)
    order = index.argsort()
    return index[order], values.index_select(dim, order)


def self_influence(
    run_dir: str | Path,
    model: nn.Module,
    task: Task,
    train,
    *,
    strategy: str = "ekfac",
    damping: float | None = None,
    dtype: torch.dtype | None = None,
    checkpoint_every: int = 8,
    progress: bool = False,
    name: str = "self",
    model_info: dict | None = None,
    weight_decay: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Self-influence <G_z, (F + damping I)^-1 G_z> of every training example, streamed, resumable and
    sharded like `score`. Returns {"index": [N], "values": [N]}, sorted by training index. High values
    flag examples the model finds hard or atypical (mislabelled examples, memorised sequences). The result
    is `run/<name>/result` (a `save_result` file of kind SelfInfluence)."""
    run_dir = Path(run_dir)
    fit_args = read_json(run_dir / "lambda" / "args.json") if strategy != "identity" else {}
    args = {
        "fit": fit_args,
        "strategy": strategy,
        "damping": damping,
        "dtype": str(dtype),
        "world_size": world_size(),
        "train": _describe(train),
    }
    if weight_decay:
        args["weight_decay"] = weight_decay
    result_path = run_dir / name / "result.safetensors"
    if check_stage(run_dir, name, args) and _complete(result_path):
        return load_result(result_path, SELF)[0]
    factors = Factors.load(run_dir / "lambda" / "factors.safetensors") if strategy != "identity" else None
    cache = fitted_cache(run_dir, fit_args, _describe(train))
    modules = task.modules(model)

    def step(state: dict[str, torch.Tensor], i: int) -> None:
        cap = run_batch(model, task, modules, cached_batch(train[i], cache, i), dtype=dtype)
        _append(state, "index", train.indices(i), 0)
        _append(
            state, "values", self_influence_of_batch(cap, factors, strategy, damping, weight_decay).cpu(), 0
        )

    states = _stream_shards(run_dir, name, len(train), step, checkpoint_every, progress)
    if is_main():
        index, values = _by_index(states, "index", "values", 0)
        save_result(
            result_path, {"index": index, "values": values}, {"arguments": args}, kind=SELF, model=model_info
        )
    barrier()
    return load_result(result_path, SELF)[0]
