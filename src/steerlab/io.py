"""The one result-file convention, and atomic writes: results appear complete or not at all.

A result is two files beside each other: `NAME.safetensors` (tensors, never pickle) and `NAME.json`
(metadata). The JSON starts with a header: `format` (what kind of result), `format_version`,
`steerlab_version` and, where a model made it, `model` (its identity: name, source, file hash). Vectors,
influence results and Hessian eigenpairs are all saved with `save_result` and read with `load_result`,
which names the file in every error. Internal stage files that travel as one file keep their metadata in
the safetensors header (`save_tensors` / `load_tensors`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from steerlab.errors import UserError

FORMAT_VERSION = 1
HEADER_KEYS = ("format", "format_version", "steerlab_version")

__all__ = [
    "FORMAT_VERSION",
    "ResultFileError",
    "atomic_write_text",
    "atomic_writer",
    "check_output_file",
    "check_output_folder",
    "load_result",
    "load_tensors",
    "parse_json",
    "read_json",
    "result_paths",
    "save_result",
    "save_tensors",
    "write_json",
]


class ResultFileError(UserError):
    """A result file is missing, truncated, not what was expected, or from a newer steerlab."""


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_writable_folder(folder: Path, option: str, named: Path) -> None:
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {named}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {named}: {existing} is not writable")


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """`path` if it is, or can become, a writable folder; otherwise a `UserError` naming `option`.

    Creates nothing: meant to run before any expensive work.
    """
    path = Path(path)
    _check_writable_folder(path, option, path)
    return path


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """`path` if a file can be written there (its folder is, or can become, writable); else a `UserError`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option}: {path} is a folder; give a file name")
    _check_writable_folder(path.parent, option, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path) as tmp:
        tmp.write_text(text)


def _finite(obj: Any) -> Any:
    """JSON has no NaN or infinity: such floats are written as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any, sort_keys: bool = False) -> None:
    """Write `obj` as indented, valid JSON (non-finite floats become null), atomically."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=sort_keys, default=float, allow_nan=False)
    atomic_write_text(path, text + "\n")


def parse_json(text: str, fail: Callable[[str, int], Exception]) -> Any:
    """`json.loads(text)`; malformed text raises `fail(message, line)`, the caller's error naming the file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise fail(f"invalid JSON at column {error.colno}: {error.msg}", error.lineno) from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a `ResultFileError` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultFileError(f"{path}: no such file") from None
    except (UnicodeDecodeError, OSError) as error:
        raise ResultFileError(f"{path}: cannot be read as UTF-8 text ({error})") from None
    return parse_json(text, lambda message, line: ResultFileError(f"{path}: line {line}: {message}"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """One safetensors file with `metadata` (JSON) in its header, written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"json": json.dumps(_finite(metadata or {}), sort_keys=True)}
    with atomic_writer(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and header metadata of a safetensors file; a bad file is a `ResultFileError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as error:  # safetensors raises its own error types (and OSError) for bad files
        raise ResultFileError(f"{path}: not a readable safetensors file ({error})") from None
    metadata = parse_json(
        header.get("json", "{}"),
        lambda message, _: ResultFileError(
            f"{path}: the metadata in its header is not valid JSON ({message})"
        ),
    )
    if not isinstance(metadata, dict):
        raise ResultFileError(f"{path}: the metadata in its header is not a JSON object")
    return tensors, metadata


def result_paths(path: str | Path) -> tuple[Path, Path]:
    """(`NAME.safetensors`, `NAME.json`) for `NAME`, `NAME.safetensors` or `NAME.json`."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_result(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict,
    *,
    kind: str,
    model: dict | None = None,
) -> Path:
    """Write `NAME.safetensors` and `NAME.json` (header + `metadata`) atomically; return the first.

    kind: what the result is, e.g. "SteeringVector" or "Eigenpairs" (checked by `load_result`).
    model: the identity of the model that made it (`LoadedModel.info.to_dict()`), where one did.
    """
    from steerlab import __version__

    tensor_path, meta_path = result_paths(path)
    header = {"format": f"steerlab.{kind}", "format_version": FORMAT_VERSION, "steerlab_version": __version__}
    body = dict(metadata)
    if model is not None:
        body["model"] = model
    save_tensors(tensor_path, tensors, {"format": header["format"], "format_version": FORMAT_VERSION})
    write_json(meta_path, {**header, **body})
    return tensor_path


def save_record(record: Any, path: str | Path, kind: str, tensors: str = "tensors") -> Path:
    """`save_result` of a dataclass: its `tensors` field (a dict of tensors) as safetensors, every other
    field as JSON metadata."""
    from dataclasses import fields

    metadata = {f.name: getattr(record, f.name) for f in fields(record) if f.name != tensors}
    return save_result(path, getattr(record, tensors), metadata, kind=kind)


def load_record(cls: type, path: str | Path, kind: str, tensors: str = "tensors") -> Any:
    """The dataclass `cls` written by `save_record`."""
    values, metadata = load_result(path, kind)
    metadata.pop("model", None)
    return cls(**{tensors: values}, **metadata)


def load_result(
    path: str | Path, kind: str | None = None, *, require_metadata: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata without the header) of a result written by `save_result`.

    Errors name the file: missing, truncated or not safetensors, a missing or malformed JSON half, another
    kind of result, or a format version newer than this steerlab reads. Files from before the header
    existed load too; `require_metadata=False` accepts a missing JSON half (metadata {}) for results that
    once kept their metadata elsewhere.
    """
    tensor_path, meta_path = result_paths(path)
    tensors, _ = load_tensors(tensor_path)
    if meta_path.exists():
        metadata = read_json(meta_path)
    elif require_metadata:
        raise ResultFileError(
            f"{meta_path}: no such file; a result is saved as {tensor_path.name} plus this metadata file "
            "(an interrupted write leaves it out: recompute the result)"
        )
    else:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ResultFileError(f"{meta_path}: expected a JSON object, got {type(metadata).__name__}")
    found = metadata.get("format")
    if kind is not None and found is not None and found != f"steerlab.{kind}":
        raise ResultFileError(f"{meta_path}: holds a {found}, not a steerlab.{kind}")
    version = metadata.get("format_version", metadata.get("version", FORMAT_VERSION))
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ResultFileError(
            f"{meta_path}: format version {version!r} is newer than this steerlab reads ({FORMAT_VERSION}); "
            "upgrade steerlab"
        )
    for key in (*HEADER_KEYS, "version"):
        metadata.pop(key, None)
    return tensors, metadata
