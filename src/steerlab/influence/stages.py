"""On-disk stages: arguments checked, results skipped when done, checkpoints resumed within a stage.

A stage lives in `run_dir/<name>/` with `args.json` (the arguments it was computed with, upstream stages'
included), `result.safetensors` when done, and `ckpt-r<rank>-w<world>.safetensors` while running: the
stage's running state (float64 sums, running top-k) and the position of the next batch. A run killed in
the middle of a stage resumes from its last checkpoint; because every batch's label sampling is seeded
from (run seed, stage, batch index) and the sums are added in the same order, the result is bitwise
identical to an uninterrupted run with the same number of processes.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from steerlab.errors import UserError
from steerlab.io import load_tensors, read_json, save_tensors, write_json

__all__ = ["StageArgumentsError", "check_stage", "checkpoint_path", "differences", "stream_stage"]

KILL_ENV = "STEERLAB_INFLUENCE_TEST_KILL"  # "stage:batches" -> SIGKILL self after that many batches (tests)


class StageArgumentsError(UserError):
    """A stage exists on disk with different arguments."""


def differences(saved: dict, new: dict) -> list[str]:
    """'key: saved X != requested Y' for every key whose value differs."""
    keys = sorted(set(saved) | set(new))
    return [
        f"{k}: saved {saved.get(k, '<absent>')!r} != requested {new.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k) != new.get(k)
    ]


def check_stage(run_dir: str | Path, name: str, args: dict) -> bool:
    """Record `args` for stage `name` (first time) or compare them with the saved ones; True when done."""
    folder = Path(run_dir) / name
    args = json.loads(json.dumps(args, sort_keys=True))  # normalise (tuples -> lists)
    saved_path = folder / "args.json"
    from steerlab.distributed import barrier, is_main

    barrier()  # every process sees the same files
    if saved_path.exists():
        saved = read_json(saved_path)
        if saved != args:
            diffs = "; ".join(differences(saved, args))
            raise StageArgumentsError(
                f"stage '{name}' in {folder} was computed with other arguments ({diffs}). "
                f"Use a new run directory, or delete {folder} to recompute it."
            )
    elif is_main():
        write_json(saved_path, args)
    done = (folder / "result.safetensors").exists()
    barrier()
    return done


def checkpoint_path(run_dir: str | Path, name: str, rank: int, world: int) -> Path:
    return Path(run_dir) / name / f"ckpt-r{rank}-w{world}.safetensors"


def _maybe_die(name: str, done: int) -> None:
    spec = os.environ.get(KILL_ENV, "")
    if spec and spec == f"{name}:{done}":
        os.kill(os.getpid(), signal.SIGKILL)


def stream_stage(
    ckpt: Path,
    name: str,
    indices: Sequence[int],
    step: Callable[[dict[str, torch.Tensor], int], None],
    checkpoint_every: int = 8,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Run `step(state, index)` for each index in order, checkpointing `state` every few batches."""
    from tqdm.auto import tqdm

    state: dict[str, torch.Tensor] = {}
    start = 0
    if ckpt.exists():
        state, meta = load_tensors(ckpt)
        start = int(meta["next"])
        if meta.get("indices") != list(indices):
            raise StageArgumentsError(
                f"checkpoint {ckpt} was written for other batches; delete it to restart"
            )
    for j in tqdm(
        range(start, len(indices)), desc=name, initial=start, total=len(indices), disable=not progress
    ):
        step(state, indices[j])
        if (j + 1) % checkpoint_every == 0 or j + 1 == len(indices):
            save_tensors(ckpt, state, {"next": j + 1, "indices": list(indices)})
            _maybe_die(name, j + 1)
    return state
