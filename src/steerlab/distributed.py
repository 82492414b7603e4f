"""torch.distributed helpers: one code path for one process, torchrun on CPU (gloo) or GPU (nccl).

Launch with `torchrun --nproc_per_node N script.py`; `init()` reads the environment torchrun sets.
Without it, every helper behaves as a single process (rank 0 of 1).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["all_gather_object", "all_reduce_sum", "barrier", "init", "is_main", "rank", "shard", "world_size"]


def init(backend: str | None = None) -> bool:
    """Initialise the default process group when launched by torchrun; returns whether distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (returns a new tensor; identity with one process)."""
    if not active():
        return tensor
    out = tensor.clone()
    if dist.get_backend() == "nccl" and not out.is_cuda:
        out = out.cuda()
        dist.all_reduce(out)
        return out.to(tensor.device)
    dist.all_reduce(out)
    return out


def all_gather_object(obj) -> list:
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(indices, rank_: int | None = None, world: int | None = None) -> list:
    """The indices this process handles: every world-th one starting at its rank."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(indices)[r::w]
