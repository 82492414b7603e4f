"""Atomic safetensors + JSON writing shared by every hessian result object."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write `obj` as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=float)

    _atomic(Path(path), write)


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def save_result(folder: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Save `tensors` to `folder/name.safetensors` and `meta` to `folder/name.json`, both atomically."""
    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(folder / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp))
    write_json(folder / f"{name}.json", meta)
    return folder


def load_result(folder: str | os.PathLike, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    return load_file(str(folder / f"{name}.safetensors")), read_json(folder / f"{name}.json")
