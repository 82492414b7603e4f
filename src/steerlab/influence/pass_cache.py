"""One captured forward/backward pass over a batch, and the pass cache that lets later passes start at the
first tracked layer and skip the output head.

Influence passes (covariance, eigenvalue correction, scoring) differ only above the first tracked layer:
with MLPs of layers 24-29 of a 30-layer model tracked, 80% of each forward pass recomputes the same hidden
states. The covariance pass records the input of block L (the first tracked layer); later passes replace
blocks 0..L-1 by a pass-through and feed the recorded states to block L, so only blocks L.. run. The
model is restored on exit, also on exceptions. Supported where decoder blocks return a tensor
(Llama-like families in transformers >= 5); the equality of logits is tested. The hooks are
`steerlab.hooks.record_block_input`, `start_at_block` and `record_head_input`.

The covariance pass also records g_h, the gradient of the data-label training loss with respect to the
output head's input h. Every later pass that uses data labels (scoring; the eigenvalue correction of the
empirical Fisher) backpropagates the surrogate <h, g_h> instead of the loss: its gradient is the same
everywhere below the head, and the head (vocabulary x hidden, the largest matrix of a small LM) is
neither run forward nor backward.

A cache maps a batch index to that batch's entry ({"prefix_hidden", "prefix_layer", "head_grad"}): a
dict in memory, or a `DiskCache` (one safetensors file per batch) for streamed runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from steerlab.hooks import record_block_input
from steerlab.hooks.capture import Captured, capture
from steerlab.hooks.modes import no_param_grads
from steerlab.influence.tasks import Task
from steerlab.io import load_tensors, save_tensors
from steerlab.memory import release_free_memory
from steerlab.models.architectures import layers_of

__all__ = [
    "Cache",
    "DiskCache",
    "cached_batch",
    "cached_rows",
    "first_tracked_layer",
    "fitted_cache",
    "recording_pass",
    "run_batch",
    "to_device",
]

Entry = dict[str, torch.Tensor]


def to_device(batch, device: torch.device):
    """Move the tensors of a dict / tuple / list batch to `device` (a no-op when already there)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _pass(
    model: nn.Module,
    task: Task,
    modules: Mapping[str, nn.Module],
    batch,
    *,
    query: bool,
    sample_seed: int | None,
    dtype: torch.dtype | None,
    record_head: bool,
) -> tuple[Captured, torch.Tensor | None]:
    """The captured pass, and (with `record_head`, where the task can) the data-label gradient at the
    head's input."""
    release_free_memory(every=4)  # earlier batches' transient buffers (see steerlab.memory)
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    generator = None
    if sample_seed is not None and not query:
        generator = torch.Generator(device=device).manual_seed(sample_seed)
    record = record_head and hasattr(task, "train_loss_and_head_gradient") and not query
    if record and getattr(model, "get_output_embeddings", lambda: None)() in modules.values():
        record = False  # the head itself is tracked: it must run in every pass
    head_grad = None
    with no_param_grads(model), capture(modules, task.token_mask(batch), dtype) as captured:
        if query:
            loss = task.query_loss(model, batch)
        elif record:
            loss, head_grad = task.train_loss_and_head_gradient(model, batch, generator)
        else:
            loss = task.train_loss(model, batch, generator)
        loss.backward()
    captured.check_complete(modules)
    return captured, head_grad


def run_batch(
    model: nn.Module,
    task: Task,
    modules: Mapping[str, nn.Module],
    batch,
    *,
    query: bool = False,
    sample_seed: int | None = None,
    dtype: torch.dtype | None = None,
) -> Captured:
    """One forward/backward of the training loss (or the query loss), capturing tracked modules.
    `sample_seed`: labels sampled from the model (true Fisher); None: the data labels."""
    return _pass(
        model, task, modules, batch, query=query, sample_seed=sample_seed, dtype=dtype, record_head=False
    )[0]


def recording_pass(
    model: nn.Module,
    task: Task,
    modules: Mapping[str, nn.Module],
    batch,
    layer: int,
    *,
    sample_seed: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Captured, Entry]:
    """`run_batch` of the training loss that also returns the batch's cache entry: the hidden states
    entering block `layer` and, where the task records it, the data-label gradient at the head's input."""
    with record_block_input(model, layer) as seen:
        captured, head_grad = _pass(
            model, task, modules, batch, query=False, sample_seed=sample_seed, dtype=dtype, record_head=True
        )
    entry = {"prefix_hidden": seen[0], "prefix_layer": torch.tensor(layer)}
    if head_grad is not None:
        entry["head_grad"] = head_grad
    return captured, entry


def first_tracked_layer(model: nn.Module, modules: Mapping[str, nn.Module]) -> int | None:
    """The lowest decoder-layer index among tracked modules (None if any is outside the decoder blocks:
    then nothing is cached)."""
    layers = list(layers_of(model, modules).values())
    return None if not layers or any(x is None for x in layers) else min(layers)


class DiskCache:
    """A cache on disk: the entry of batch i in `folder/batch-<i>.safetensors`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @classmethod
    def of_run(cls, run_dir: str | Path) -> DiskCache:
        """The cache of a streamed run (`run_dir/prefix/`)."""
        return cls(Path(run_dir) / "prefix")

    def path(self, index: int) -> Path:
        return self.folder / f"batch-{index:07d}.safetensors"

    def __setitem__(self, index: int, entry: Entry) -> None:
        save_tensors(self.path(index), entry)

    def get(self, index: int, default: Entry | None = None) -> Entry | None:
        path = self.path(index)
        return load_tensors(path)[0] if path.exists() else default


Cache = dict[int, Entry] | DiskCache  # batch index -> entry, in memory or on disk


def fitted_cache(run_dir: str | Path, fit_args: dict, train_description: dict) -> DiskCache | None:
    """The run's cache when its fit recorded one for this training source: cached states belong to the
    fitted corpus and its batching (None otherwise)."""
    applies = bool(fit_args.get("prefix_cache")) and fit_args.get("train") == train_description
    return DiskCache.of_run(run_dir) if applies else None


def cached_batch(batch, cache: Cache | None, index: int):
    """`batch` with its cache entry merged in, so that the pass starts at the cached layer (unchanged
    without a cache, an entry, or a dict batch)."""
    entry = cache.get(index) if cache is not None and isinstance(batch, dict) else None
    return batch if entry is None else {**batch, **entry}


def cached_rows(batch, cache: Cache | None, examples: torch.Tensor, batch_size: int):
    """A batch of arbitrary training examples (e.g. TF-IDF candidates) with their cached states gathered
    from the cached batches (example j is row j % batch_size of batch j // batch_size). Batches are
    right-padded, so each row is cut or zero-padded to this batch's length. Unchanged unless every
    example's batch is cached."""
    if cache is None or not isinstance(batch, dict):
        return batch
    length = batch["input_ids"].shape[1]
    loaded: dict[int, Entry] = {}
    rows: dict[str, list[torch.Tensor]] = {"prefix_hidden": [], "head_grad": []}
    for j in examples.tolist():
        b, r = divmod(int(j), batch_size)
        if b not in loaded:
            entry = cache.get(b)
            if entry is None:
                return batch
            loaded[b] = entry
        for key in rows:
            if key in loaded[b]:
                row = loaded[b][key][r, :length]
                rows[key].append(torch.nn.functional.pad(row, (0, 0, 0, length - row.shape[0])))
    out = {**batch, "prefix_layer": next(iter(loaded.values()))["prefix_layer"]}
    for key, values in rows.items():
        if len(values) == len(examples):
            out[key] = torch.stack(values)
    return out
