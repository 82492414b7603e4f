"""Atomic safetensors + JSON writing shared by every hessian result object."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steerlab.io import atomic_write_text, atomic_writer


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=float))


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def save_result(folder: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Save `tensors` to `folder/name.safetensors` and `meta` to `folder/name.json`, both atomically."""
    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_writer(folder / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / f"{name}.json", meta)
    return folder


def load_result(folder: str | os.PathLike, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    return load_file(str(folder / f"{name}.safetensors")), read_json(folder / f"{name}.json")
