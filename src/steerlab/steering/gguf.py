"""llama.cpp control vectors: a `SteeringVector` to and from the GGUF file that `llama-cli --control-vector`
reads and repeng's `ControlVector.export_gguf` writes.

The file has architecture `controlvector`, the keys `controlvector.model_hint` (the model family, e.g.
"llama") and `controlvector.layer_count` (the number of directions), and one float32 tensor of width
d_model per layer, named `direction.N`.

Layer convention: `direction.N` is added to the output of decoder block N (0-based), which is
steerlab's layer N, so the numbers are the same in both. llama.cpp adds tensor N after block `il = N` of
its layer loop (`build_cvec(cur, il)`), and repeng reads direction N from `hidden_states[N + 1]`.
llama.cpp never applies `direction.0` (its loader rejects such a file), so layer 0 cannot be exported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from steerlab.io import ResultFileError, atomic_writer
from steerlab.steering.vector import InvalidVectorError, LayerChoiceError, SteeringVector

ARCHITECTURE = "controlvector"
PREFIX = "direction."

__all__ = ["ControlVectorFileError", "export_control_vector", "import_control_vector"]


class ControlVectorFileError(ResultFileError):
    """A file is not a readable llama.cpp control vector (not GGUF, another architecture, odd tensors)."""


def _llama_layers(vector: SteeringVector, layers: Iterable[int] | None) -> dict[int, int]:
    """llama.cpp layer (block index, >= 1) -> the stored key it comes from."""
    n = (vector.metadata.get("model") or {}).get("num_layers")
    chosen = vector.layers if layers is None else list(layers)
    out: dict[int, int] = {}
    for requested in chosen:
        key = vector.stored_layer(requested)
        layer = key if key >= 0 or not isinstance(n, int) else key % n
        if layer < 0:
            raise LayerChoiceError(
                f"layer {key}: a control vector numbers layers from the start of the model, and this vector "
                "does not record how many layers its model has"
            )
        if layer == 0:
            raise LayerChoiceError(
                "layer 0: llama.cpp applies no control vector after block 0 (it does not read direction.0); "
                f"export only the other layers of {vector.layers}"
            )
        out[layer] = key
    return out


def export_control_vector(
    vector: SteeringVector,
    path: str | Path,
    model_hint: str | None = None,
    layers: Iterable[int] | None = None,
) -> Path:
    """Write `vector` (float32) as a llama.cpp control vector, atomically; return the path.

    `direction.N` holds steerlab layer N (see the module docstring). model_hint: the model family
    (default: the `model_type` recorded at extraction, or the hint of an imported file, else "unknown"). layers: the layers to write
    (default: every stored one; negative ones count from the end of the recorded model). llama.cpp adds
    `strength x direction` (`--control-vector-scaled FILE STRENGTH`, default 1) at every token.
    """
    import gguf

    chosen = _llama_layers(vector, layers)
    if model_hint is None:
        recorded = (vector.metadata.get("model") or {}).get("model_type")
        model_hint = str(recorded or (vector.metadata.get("source") or {}).get("model_hint") or "unknown")
    path = Path(path)
    with atomic_writer(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(chosen))
        for layer in sorted(chosen):
            direction = vector.vectors[chosen[layer]].detach().float().cpu().numpy()
            writer.add_tensor(f"{PREFIX}{layer}", np.ascontiguousarray(direction, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    value = None if field is None else field.contents()
    return value if isinstance(value, str) else None


def _read(path: Path) -> tuple[str | None, str | None, dict[str, np.ndarray]]:
    """(architecture, model hint, tensors by name) of a GGUF file; an unreadable file names itself."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        arch = _string_field(reader, "general.architecture")
        hint = _string_field(reader, f"{ARCHITECTURE}.model_hint")
        tensors = {}
        for tensor in reader.tensors:
            data = np.array(tensor.data)
            if data.dtype.kind != "f" or data.ndim != 1:
                raise ControlVectorFileError(
                    f"{path}: tensor {tensor.name!r} is {tensor.tensor_type.name} with shape "
                    f"{list(data.shape)}; a direction is a 1-D float tensor"
                )
            tensors[tensor.name] = data
    except ControlVectorFileError:
        raise
    except Exception as error:  # the gguf reader raises ValueError, struct or numpy errors for bad files
        raise ControlVectorFileError(f"{path}: not a readable GGUF file ({error})") from None
    return arch, hint, tensors


def import_control_vector(path: str | Path) -> SteeringVector:
    """Read a llama.cpp control vector (e.g. written by repeng) as a `SteeringVector`.

    `direction.N` becomes steerlab layer N (see the module docstring). The metadata records the source
    file, its SHA-256 and the model hint; no residual norms are known, so `multiplier_for_fraction` is
    unavailable and multipliers are given explicitly. Errors name the file (`ControlVectorFileError`,
    `InvalidVectorError`).
    """
    path = Path(path)
    if not path.is_file():
        raise ControlVectorFileError(f"{path}: no such file")
    arch, hint, tensors = _read(path)
    if arch != ARCHITECTURE:
        found = "no architecture" if arch is None else f"architecture {arch!r}"
        raise ControlVectorFileError(f"{path}: has {found}, not {ARCHITECTURE!r}: not a control vector")
    vectors: dict[int, torch.Tensor] = {}
    for name, data in tensors.items():
        index = name[len(PREFIX) :] if name.startswith(PREFIX) else ""
        if not index.isdigit():
            raise ControlVectorFileError(f"{path}: unexpected tensor {name!r} (expected 'direction.<layer>')")
        vectors[int(index)] = torch.from_numpy(data.astype(np.float32))
    if not vectors:
        raise ControlVectorFileError(f"{path}: holds no direction tensors")
    metadata = {
        "method": "imported",
        "source": {
            "format": "llama.cpp control vector (GGUF)",
            "file": str(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "model_hint": hint,
        },
        "layers": sorted(vectors),
        "norms": {str(layer): float(vec.double().norm()) for layer, vec in vectors.items()},
    }
    try:
        return SteeringVector(vectors, metadata)
    except InvalidVectorError as error:
        raise InvalidVectorError(str(path), error.problem, in_metadata=error.in_metadata) from None
