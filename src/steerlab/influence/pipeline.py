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
    covariance_update,
    eigendecompose,
    finish_lambda,
    label_draws,
    lambda_update,
    run_batch,
    run_batch_recording,
)
from steerlab.influence.prefix import first_tracked_layer
from steerlab.influence.scores import (
    Preconditioned,
    layer_of,
    preconditioned_queries,
    query_gradients,
    score_captured,
    self_influence_of_batch,
)
from steerlab.influence.stages import check_stage, checkpoint_path, stream_stage
from steerlab.influence.tasks import Task
from steerlab.influence.topk import merge_topk, update_topk
from steerlab.io import load_tensors, read_json, save_tensors

__all__ = ["BlockBatches", "TensorBatches", "fit", "load_scores", "score", "self_influence", "tensor_hash"]


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


def _prefix_path(run_dir: Path, index: int) -> Path:
    return run_dir / "prefix" / f"batch-{index:07d}.safetensors"


def with_prefix(run_dir: Path, batch, index: int):
    """The batch with its cached hidden states merged in, when the covariance pass stored them."""
    path = _prefix_path(run_dir, index)
    if not isinstance(batch, dict) or not path.exists():
        return batch
    return {**batch, **load_tensors(path)[0]}


def with_prefix_rows(run_dir: Path, batch, examples: torch.Tensor, batch_size: int):
    """A batch of arbitrary training examples (e.g. TF-IDF candidates) with their cached states gathered
    from the fitted batches (example j is row j % batch_size of batch j // batch_size). Batches are
    right-padded, so each row is cut or zero-padded to this batch's length."""
    if not isinstance(batch, dict):
        return batch
    length = batch["input_ids"].shape[1]
    loaded: dict[int, dict[str, torch.Tensor]] = {}
    rows: dict[str, list[torch.Tensor]] = {"prefix_hidden": [], "head_grad": []}
    for j in examples.tolist():
        b, r = divmod(int(j), batch_size)
        if b not in loaded:
            path = _prefix_path(run_dir, b)
            if not path.exists():
                return batch
            loaded[b] = load_tensors(path)[0]
        for key in rows:
            if key in loaded[b]:
                row = loaded[b][key][r, :length]
                rows[key].append(torch.nn.functional.pad(row, (0, 0, 0, length - row.shape[0])))
    out = {**batch, "prefix_layer": next(iter(loaded.values()))["prefix_layer"]}
    for key, values in rows.items():
        if len(values) == len(examples):
            out[key] = torch.stack(values)
    return out


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
) -> Factors:
    """Fit EK-FAC factors over the indexable batch source `train`, stage by stage (see module docs).
    `seed=None`: empirical Fisher (data labels); otherwise labels sampled per batch from the model,
    `samples` draws per example (averaged: a less noisy true Fisher, at `samples` passes).
    `prefix_cache`: the covariance pass stores the hidden states entering the first tracked layer
    (`run/prefix/`), and later passes start there (see `prefix`)."""
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
    layer = first_tracked_layer(modules) if prefix_cache else None
    if not check_stage(run_dir, "covariance", args):

        def cov_step(acc: Accumulator, i: int) -> None:
            batch = train[i]
            for k, sample in enumerate(label_draws(seed, i, "covariance", samples)):
                if k > 0:
                    cap = run_batch(
                        model, task, modules, with_prefix(run_dir, batch, i), sample_seed=sample, dtype=dtype
                    )
                elif layer is None:
                    cap = run_batch(model, task, modules, batch, sample_seed=sample, dtype=dtype)
                else:
                    cache: dict = {}
                    cap = run_batch_recording(model, task, modules, batch, layer, cache, i, sample, dtype)
                    save_tensors(_prefix_path(run_dir, i), cache[i])
                covariance_update(acc, cap, task.batch_size(batch), task.token_mask(batch))

        _accumulate(run_dir, "covariance", train, cov_step, checkpoint_every, progress)
    cov, _ = Accumulator.load(run_dir / "covariance" / "result.safetensors")

    if not check_stage(run_dir, "eigen", args):
        if is_main():
            eigendecompose(cov, list(modules)).save(run_dir / "eigen" / "result.safetensors")
        barrier()
    eigen = Factors.load(run_dir / "eigen" / "result.safetensors")

    lam_args = {**args, "diagonal": diagonal}
    if not check_stage(run_dir, "lambda", lam_args):

        def lam_step(acc: Accumulator, i: int) -> None:
            batch = with_prefix(run_dir, train[i], i)
            for sample in label_draws(seed, i, "lambda", samples):
                cap = run_batch(model, task, modules, batch, sample_seed=sample, dtype=dtype)
                lambda_update(acc, cap, eigen, task.batch_size(batch), diagonal)

        _accumulate(run_dir, "lambda", train, lam_step, checkpoint_every, progress)
    factors_path = run_dir / "lambda" / "factors.safetensors"
    barrier()
    missing = not factors_path.exists()
    barrier()
    if missing:
        if is_main():
            lam, _ = Accumulator.load(run_dir / "lambda" / "result.safetensors")
            finish_lambda(eigen, lam).save(factors_path)
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
) -> dict[str, torch.Tensor]:
    """Score every query against the training batches (an indexable source with `indices(i)`, like
    `BlockBatches` or `TensorBatches`) (or, with `candidates` [Q, m], against each query's
    candidates only), keeping per query the top-k and bottom-k scores and indices, the summed |score| per
    layer, and the scores of every `sample_stride`-th training example (for histograms)."""
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
    result_path = run_dir / name / "result.safetensors"
    if check_stage(run_dir, name, sargs):
        return load_tensors(result_path)[0]

    source = train
    allowed = None
    if candidates is not None:
        source = train.with_subset(sorted(set(candidates.reshape(-1).tolist())))
        allowed = torch.zeros(n_queries, train.n_examples, dtype=torch.bool)
        allowed.scatter_(1, candidates.long(), True)
    use_prefix = _cache_applies(fit_args, train)
    modules = {n: m for n, m in task.modules(model).items() if n in pre.modules}
    layers = sorted({layer_of(n) if layer_of(n) is not None else -1 for n in modules})

    def step(state: dict[str, torch.Tensor], i: int) -> None:
        idx = source.indices(i)
        batch = source[i]
        if use_prefix and candidates is None:
            batch = with_prefix(run_dir, batch, i)
        elif use_prefix:
            batch = with_prefix_rows(run_dir, batch, idx, train.batch_size)
        cap = run_batch(model, task, modules, batch, dtype=dtype)
        per_module, _ = score_captured(cap, pre)
        total = sum(per_module.values()).double().cpu()
        if allowed is not None:
            total = total.masked_fill(~allowed[:, idx], float("nan"))
        update_topk(state, total, idx, top_k)
        layer_abs = torch.zeros(n_queries, len(layers), dtype=torch.float64)
        for n, s in per_module.items():
            lay = layer_of(n)
            s = s.double().abs().cpu()
            if allowed is not None:
                s = s.masked_fill(~allowed[:, idx], 0.0)
            layer_abs[:, layers.index(-1 if lay is None else lay)] += s.sum(1)
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
        save_tensors(result_path, out)
    barrier()
    return load_tensors(result_path)[0]


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


def _cache_applies(fit_args: dict, train) -> bool:
    """Cached pass states belong to the fitted corpus and its batching: usable only for that corpus."""
    return bool(fit_args.get("prefix_cache")) and fit_args.get("train") == _describe(train)


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
) -> dict[str, torch.Tensor]:
    """Self-influence <G_z, (F + damping I)^-1 G_z> of every training example, streamed, resumable and
    sharded like `score`. Returns {"index": [N], "values": [N]}, sorted by training index. High values
    flag examples the model finds hard or atypical (mislabelled examples, memorised sequences)."""
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
    result_path = run_dir / name / "result.safetensors"
    if check_stage(run_dir, name, args):
        return load_tensors(result_path)[0]
    factors = Factors.load(run_dir / "lambda" / "factors.safetensors") if strategy != "identity" else None
    use_prefix = _cache_applies(fit_args, train)
    modules = task.modules(model)

    def step(state: dict[str, torch.Tensor], i: int) -> None:
        batch = with_prefix(run_dir, train[i], i) if use_prefix else train[i]
        cap = run_batch(model, task, modules, batch, dtype=dtype)
        _append(state, "index", train.indices(i), 0)
        _append(state, "values", self_influence_of_batch(cap, factors, strategy, damping).cpu(), 0)

    states = _stream_shards(run_dir, name, len(train), step, checkpoint_every, progress)
    if is_main():
        index, values = _by_index(states, "index", "values", 0)
        save_tensors(result_path, {"index": index, "values": values})
    barrier()
    return load_tensors(result_path)[0]


def load_scores(run_dir: str | Path, name: str = "scores") -> dict[str, torch.Tensor]:
    return load_tensors(Path(run_dir) / name / "result.safetensors")[0]
