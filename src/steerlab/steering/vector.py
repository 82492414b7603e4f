"""SteeringVector: per-layer directions plus the metadata needed to trust and reuse them."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerlab.errors import UserError
from steerlab.hooks import Positions, as_module, steer
from steerlab.io import ResultFileError, load_result, result_paths, save_result
from steerlab.models.architectures import hidden_size, num_layers

STRONG_STEERING_RATIO = 10.0
"""`apply` warns when the added norm |m| x |v| exceeds this many times the recorded residual norm."""


class VectorError(UserError):
    """A steering vector cannot be used as asked."""


class InvalidVectorError(VectorError):
    """A vector holds NaN, infinite or all-zero values, or its metadata disagrees with its tensors.

    `problem` is the message without its prefix; `in_metadata` says whether the metadata is at fault.
    """

    def __init__(self, prefix: str, problem: str, *, in_metadata: bool = False) -> None:
        super().__init__(f"{prefix}: {problem}")
        self.problem = problem
        self.in_metadata = in_metadata


class LayerChoiceError(VectorError):
    """A requested layer is outside the model or not stored in the vector."""


class StrongSteeringWarning(UserWarning):
    """The added vector is far larger than the residual stream it is added to."""


def tensor_problem(vectors: Mapping[int, torch.Tensor]) -> str | None:
    """What is wrong with per-layer directions (none stored, widths differ, NaN/inf, all zeros), or None."""
    if not vectors:
        return "it stores no layer"
    widths = {layer: int(vec.numel()) for layer, vec in vectors.items()}
    if len(set(widths.values())) > 1:
        return f"its layers have different widths {dict(sorted(widths.items()))}"
    for layer in sorted(vectors):
        vec = vectors[layer].detach()
        bad = int((~torch.isfinite(vec)).sum())
        if bad:
            return f"layer {layer}: {bad} of {vec.numel()} values are NaN or infinite"
        if not bool(vec.any()):
            return f"layer {layer}: the vector is all zeros"
    return None


def metadata_problem(vectors: Mapping[int, torch.Tensor], metadata: Mapping) -> str | None:
    """What in `metadata` disagrees with the tensors (layers, norms, residual norms, model width), or None."""
    stored = {str(layer) for layer in vectors}
    listed = sorted(vectors)
    width = int(next(iter(vectors.values())).numel())
    model = metadata.get("model")
    if isinstance(model, dict):
        name = model.get("name", "the model")
        recorded = model.get("hidden_size")
        if isinstance(recorded, int) and recorded != width:
            return f"records hidden size {recorded} for {name} but the tensors have width {width}"
        n = model.get("num_layers")
        if isinstance(n, int) and any(not -n <= layer < n for layer in vectors):
            return f"records {n} layers for {name} but the tensors hold layers {listed}"
    for key, kind in (("layers", list), ("norms", dict), ("residual_norms", dict)):
        if key not in metadata:
            continue
        value = metadata[key]
        if not isinstance(value, kind):
            return f"field {key!r} should be a JSON {'list' if kind is list else 'object'}, got {value!r}"
        keys = {str(k) for k in value}
        if keys != stored:
            named = sorted(keys, key=lambda k: (len(k), k))
            return f"field {key!r} names layers {named} but the tensors hold layers {listed}"
    for layer, value in metadata.get("residual_norms", {}).items():
        if not _positive(value):
            return f"field 'residual_norms': layer {layer} has {value!r}, expected a positive number"
    for layer, value in metadata.get("norms", {}).items():
        actual = float(vectors[int(layer)].double().norm())
        if not _positive(value) or not math.isclose(value, actual, rel_tol=1e-3):
            return f"field 'norms': layer {layer} has {value!r} but the tensor's norm is {actual:.6g}"
    return None


def _positive(value) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


@dataclass
class SteeringVector:
    """One direction per layer (float32, shape (d_model,)) and a metadata dict (JSON-serialisable).

    The constructor checks the vector (finite, not all zeros, one width) and that the metadata agrees
    with it, raising `InvalidVectorError`.
    """

    vectors: dict[int, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = tensor_problem(self.vectors)
        if problem:
            raise InvalidVectorError("steering vector", problem)
        problem = metadata_problem(self.vectors, self.metadata)
        if problem:
            raise InvalidVectorError("steering vector", problem, in_metadata=True)

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).numel())

    def _model_layers(self) -> int | None:
        n = (self.metadata.get("model") or {}).get("num_layers")
        return n if isinstance(n, int) else None

    def stored_layer(self, layer: int, model_layers: int | None = None) -> int:
        """The key under which `layer` is stored; negative layers count from the end of the model.

        model_layers: the model's layer count (default: the one recorded at extraction). Raises
        `LayerChoiceError` naming the model's layers and the stored ones.
        """
        n = self._model_layers() if model_layers is None else model_layers
        if n is None:
            if layer in self.vectors:
                return layer
            hint = "; a negative layer counts from the end of a model whose size this vector does not record"
            raise LayerChoiceError(
                f"layer {layer}: this vector stores layers {self.layers}{hint if layer < 0 else ''}"
            )
        if not -n <= layer < n:
            raise LayerChoiceError(
                f"layer {layer} is out of range: the model has {n} layers (0..{n - 1}, or -{n}..-1 counting "
                f"from the end); this vector stores layers {self.layers}"
            )
        for key in self.vectors:
            if -n <= key < n and key % n == layer % n:
                return key
        alias = f" (= layer {layer % n})" if layer < 0 else ""
        raise LayerChoiceError(
            f"layer {layer}{alias} is not stored in this vector: it stores layers {self.layers} "
            f"of the model's {n} (0..{n - 1})"
        )

    def norm(self, layer: int) -> float:
        return float(self.vectors[self.stored_layer(layer)].double().norm())

    def residual_norm(self, layer: int) -> float | None:
        """Mean norm of the residual stream where the vector was read (from extraction), if known."""
        value = (self.metadata.get("residual_norms") or {}).get(str(self.stored_layer(layer)))
        return None if value is None else float(value)

    def multiplier_for_fraction(self, layer: int, fraction: float) -> float:
        """The multiplier m with ||m v|| = fraction x the residual norm at `layer`."""
        if not math.isfinite(fraction):
            raise VectorError(f"fraction {fraction} is not a finite number")
        key = self.stored_layer(layer)
        residual = self.residual_norm(key)
        if residual is None:
            raise VectorError(
                f"this vector records no residual norm at layer {key} (only extraction records one), "
                "so a fraction of it has no meaning; pass an explicit multiplier"
            )
        norm = self.norm(key)
        if not norm > 0:
            raise InvalidVectorError("steering vector", f"layer {key}: the vector is all zeros")
        return fraction * residual / norm

    def signed_fraction(self, layer: int, multiplier: float) -> float | None:
        """multiplier x |v| / the recorded residual norm at `layer`: the signed fraction that `multiplier`
        adds (None when no residual norm is recorded); the inverse of `multiplier_for_fraction`."""
        residual = self.residual_norm(layer)
        return None if residual is None else multiplier * self.norm(layer) / residual

    def fraction_of_residual(self, layer: int, multiplier: float) -> float | None:
        """|multiplier| x |v| over the recorded residual norm at `layer` (None when none is recorded)."""
        fraction = self.signed_fraction(layer, multiplier)
        return None if fraction is None else abs(fraction)

    def check_compatible(self, model) -> None:
        """Raise a `VectorError` unless the vector's width and stored layers fit `model`."""
        module = as_module(model)
        width = hidden_size(module)
        if width != self.hidden_size:
            source = (self.metadata.get("model") or {}).get("name", "another model")
            raise InvalidVectorError(
                "steering vector",
                f"width {self.hidden_size} (extracted from {source}) but this model's residual stream has "
                f"width {width}",
            )
        n = num_layers(module)
        outside = [layer for layer in self.layers if not -n <= layer < n]
        if outside:
            raise LayerChoiceError(
                f"this vector stores layers {self.layers} but the model has {n} layers (0..{n - 1})"
            )

    def apply(
        self,
        model,
        layer: int | Iterable[int] | None = None,
        multiplier: float = 1.0,
        positions: Positions | None = None,
    ) -> AbstractContextManager[None]:
        """Context manager adding `multiplier x` the vector at `layer` (default: every stored layer).

        Warns (`StrongSteeringWarning`) when the added norm is over `STRONG_STEERING_RATIO` times the
        residual norm recorded at extraction. The tensors were checked at construction, not again here.
        """
        if not math.isfinite(multiplier):
            raise VectorError(f"multiplier {multiplier} is not a finite number")
        self.check_compatible(model)
        module = as_module(model)
        n = num_layers(module)
        if layer is None:
            chosen = self.layers
        elif isinstance(layer, int):
            chosen = [layer]
        else:
            chosen = list(layer)
        vectors = {}
        for requested in chosen:
            key = self.stored_layer(requested, n)
            vectors[key % n] = self.vectors[key]
            self._warn_if_strong(key, multiplier)
        return steer(module, vectors, multiplier=multiplier, positions=positions)

    def _warn_if_strong(self, layer: int, multiplier: float) -> None:
        ratio = self.fraction_of_residual(layer, multiplier)
        if ratio is not None and ratio > STRONG_STEERING_RATIO:
            warnings.warn(
                f"layer {layer}: multiplier {multiplier:.4g} adds a vector of norm "
                f"{abs(multiplier) * self.norm(layer):.4g}, {ratio:.3g}x the residual norm "
                f"{self.residual_norm(layer):.4g} recorded at extraction; expect degenerate outputs "
                "(fractions of 0.05-1 of the residual norm are typical)",
                StrongSteeringWarning,
                stacklevel=3,
            )

    def save(self, path: str | Path) -> Path:
        """Write `<path>.safetensors` (tensors) and `<path>.json` (metadata) atomically; return the first."""
        tensors = {f"layer.{layer}": vec.detach().float() for layer, vec in self.vectors.items()}
        return save_result(path, tensors, self.metadata, kind="SteeringVector")

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Read a saved vector; errors name the file and what is wrong (`ResultFileError`,
        `InvalidVectorError`)."""
        tensor_path, meta_path = result_paths(path)
        tensors, metadata = load_result(path, kind="SteeringVector")
        vectors = {}
        for key, value in tensors.items():
            prefix, _, index = key.partition(".")
            if prefix != "layer" or not index.lstrip("-").isdigit():
                raise ResultFileError(f"{tensor_path}: unexpected tensor {key!r} (expected 'layer.<index>')")
            vectors[int(index)] = value
        try:
            return cls(vectors, metadata)
        except InvalidVectorError as error:
            where = meta_path if error.in_metadata else tensor_path
            raise InvalidVectorError(str(where), error.problem, in_metadata=error.in_metadata) from None

    # --- arithmetic: each result is a new vector; residual norms are kept from `self` -----------------

    def _derived(self, vectors: dict[int, torch.Tensor], method: str, **params) -> SteeringVector:
        metadata = {**self.metadata, "method": method, "operands": [self.metadata.get("method")], **params}
        metadata["layers"] = sorted(vectors)
        metadata["norms"] = {str(layer): float(vec.double().norm()) for layer, vec in vectors.items()}
        if "residual_norms" in self.metadata:
            metadata["residual_norms"] = {
                str(layer): self.metadata["residual_norms"][str(layer)] for layer in vectors
            }
        return SteeringVector(vectors, metadata)

    def _paired(self, other: SteeringVector, what: str) -> None:
        if other.layers != self.layers or other.hidden_size != self.hidden_size:
            raise VectorError(
                f"cannot {what} vectors of layers {self.layers} (width {self.hidden_size}) and "
                f"{other.layers} (width {other.hidden_size}): they must store the same layers and width"
            )

    def _combine(self, other: SteeringVector, sign: float, method: str) -> SteeringVector:
        self._paired(other, method)
        vectors = {
            layer: (vec.double() + sign * other.vectors[layer].double()).float()
            for layer, vec in self.vectors.items()
        }
        result = self._derived(vectors, method)
        result.metadata["operands"].append(other.metadata.get("method"))
        return result

    def __add__(self, other: SteeringVector) -> SteeringVector:
        """Per-layer sum (same layers and width); metadata from `self`, method "sum"."""
        return self._combine(other, 1.0, "sum")

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        """Per-layer difference (same layers and width); metadata from `self`, method "difference"."""
        return self._combine(other, -1.0, "difference")

    def scaled(self, factor: float) -> SteeringVector:
        """`factor` x the vector at every layer."""
        if not math.isfinite(factor) or factor == 0:
            raise VectorError(f"scale factor {factor} must be a finite non-zero number")
        vectors = {layer: (vec.double() * factor).float() for layer, vec in self.vectors.items()}
        return self._derived(vectors, "scaled", factor=factor)

    def normalised(self) -> SteeringVector:
        """The vector with unit norm at every layer."""
        vectors = {layer: (vec.double() / vec.double().norm()).float() for layer, vec in self.vectors.items()}
        return self._derived(vectors, "normalised")

    def orthogonalised(self, other: SteeringVector) -> SteeringVector:
        """Per layer, the vector minus its projection on `other` (v - (v.u / u.u) u)."""
        self._paired(other, "orthogonalise")
        vectors = {}
        for layer, vec in self.vectors.items():
            v, u = vec.double(), other.vectors[layer].double()
            vectors[layer] = (v - (v @ u) / (u @ u) * u).float()
        result = self._derived(vectors, "orthogonalised")
        result.metadata["operands"].append(other.metadata.get("method"))
        return result

    def random_like(self, seed: int = 0) -> SteeringVector:
        """A control: random directions with the same per-layer norms."""
        generator = torch.Generator().manual_seed(seed)
        vectors = {}
        for layer, vec in self.vectors.items():
            noise = torch.randn(vec.shape, generator=generator, dtype=torch.float64)
            vectors[layer] = (noise / noise.norm() * vec.double().norm()).to(vec.dtype)
        return SteeringVector(vectors, {**self.metadata, "method": "random-control", "seed": seed})
