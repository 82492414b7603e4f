"""SteeringVector: per-layer directions plus the metadata needed to trust and reuse them."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerlab.hooks import Positions, as_module, steer
from steerlab.io import ResultFileError, load_result, result_paths, save_result
from steerlab.models.architectures import hidden_size, resolve_layer


@dataclass
class SteeringVector:
    """One direction per layer (float32, shape (d_model,)) and a metadata dict (JSON-serialisable)."""

    vectors: dict[int, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).numel())

    def norm(self, layer: int) -> float:
        return float(self.vectors[layer].norm())

    def residual_norm(self, layer: int) -> float | None:
        """Mean norm of the residual stream where the vector was read (from extraction), if known."""
        value = self.metadata.get("residual_norms", {}).get(str(layer))
        return None if value is None else float(value)

    def multiplier_for_fraction(self, layer: int, fraction: float) -> float:
        """The multiplier m with ||m v|| = fraction x the residual norm at `layer`."""
        residual = self.residual_norm(layer)
        if residual is None:
            raise ValueError("this vector has no recorded residual norm; pass an explicit multiplier")
        return fraction * residual / max(self.norm(layer), 1e-12)

    def check_compatible(self, model) -> None:
        module = as_module(model)
        width = hidden_size(module)
        if width != self.hidden_size:
            source = self.metadata.get("model", {}).get("name", "another model")
            raise ValueError(
                f"steering vector has width {self.hidden_size} (extracted from {source}) but this model's "
                f"residual stream has width {width}"
            )
        for layer in self.layers:
            resolve_layer(module, layer)

    def apply(
        self,
        model,
        layer: int | Iterable[int] | None = None,
        multiplier: float = 1.0,
        positions: Positions | None = None,
    ) -> AbstractContextManager[None]:
        """Context manager adding `multiplier x` the vector at `layer` (default: every stored layer)."""
        self.check_compatible(model)
        module = as_module(model)
        if layer is None:
            chosen = self.layers
        elif isinstance(layer, int):
            chosen = [layer]
        else:
            chosen = list(layer)
        stored = {resolve_layer(module, key): key for key in self.layers}
        vectors = {}
        for requested in chosen:
            resolved = resolve_layer(module, requested)
            if resolved not in stored:
                raise KeyError(f"no vector for layer {requested}; this vector has layers {self.layers}")
            vectors[resolved] = self.vectors[stored[resolved]]
        return steer(module, vectors, multiplier=multiplier, positions=positions)

    def save(self, path: str | Path) -> Path:
        """Write `<path>.safetensors` (tensors) and `<path>.json` (metadata) atomically; return the first."""
        tensors = {f"layer.{layer}": vec.detach().float() for layer, vec in self.vectors.items()}
        return save_result(path, tensors, self.metadata, kind="SteeringVector")

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        tensors, metadata = load_result(path, kind="SteeringVector")
        tensor_path = result_paths(path)[0]
        vectors = {}
        for key, value in tensors.items():
            if not key.startswith("layer."):
                raise ResultFileError(f"{tensor_path}: unexpected tensor {key!r} (expected 'layer.<index>')")
            vectors[int(key.split(".", 1)[1])] = value
        return cls(vectors, metadata)

    def random_like(self, seed: int = 0) -> SteeringVector:
        """A control: random directions with the same per-layer norms."""
        generator = torch.Generator().manual_seed(seed)
        vectors = {}
        for layer, vec in self.vectors.items():
            noise = torch.randn(vec.shape, generator=generator, dtype=torch.float64)
            vectors[layer] = (noise / noise.norm() * vec.double().norm()).to(vec.dtype)
        return SteeringVector(vectors, {**self.metadata, "method": "random-control", "seed": seed})
