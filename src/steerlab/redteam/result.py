"""The result of a red-teaming run: a folder with the run's settings (`config.json`), the unperturbed
baseline (`base`) and one result file pair per (method, layer, eps) cell, each written atomically, so an
interrupted run resumes by skipping the cells already on disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerlab.io import ResultFileError, load_result, read_json, result_paths, save_result, write_json

METHODS = ("optimised", "diff-of-means", "per-prompt", "melbo", "random")


@dataclass
class Cell:
    """One attack at one layer and budget, judged on the held-out prompts.

    refused: (V, N) bool, one row per vector (V = 1, or the number of random directions).
    deltas: the perturbations, (V, D) or (N, D) for `per-prompt`.
    generations: replies (one list per vector, maybe only the first vectors' or the first prompts').
    kl, ppl: mean KL(unperturbed || perturbed) and perplexity on harmless prompts + their unperturbed
        replies (None where not measured, e.g. per-prompt perturbations).
    """

    method: str
    layer: int
    eps: float
    radius: float
    refused: torch.Tensor
    deltas: torch.Tensor
    generations: list[list[str]] = field(default_factory=list)
    kl: float | None = None
    ppl: float | None = None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return cell_name(self.method, self.layer, self.eps)

    def save(self, folder: str | Path) -> Path:
        meta = {
            "method": self.method,
            "layer": self.layer,
            "eps": self.eps,
            "radius": self.radius,
            "generations": self.generations,
            "kl": self.kl,
            "ppl": self.ppl,
            "losses": self.losses,
            "seconds": self.seconds,
            "extra": self.extra,
        }
        tensors = {"refused": self.refused.to(torch.uint8), "deltas": self.deltas}
        return save_result(Path(folder) / "cells" / self.name, tensors, meta, kind="RedteamCell")

    @classmethod
    def load(cls, path: str | Path) -> Cell:
        tensors, meta = load_result(path, "RedteamCell")
        return cls(
            meta["method"],
            int(meta["layer"]),
            float(meta["eps"]),
            float(meta["radius"]),
            tensors["refused"].bool(),
            tensors["deltas"],
            meta.get("generations", []),
            meta.get("kl"),
            meta.get("ppl"),
            meta.get("losses", []),
            float(meta.get("seconds", 0.0)),
            meta.get("extra", {}),
        )


def cell_name(method: str, layer: int, eps: float) -> str:
    return f"{method}_L{layer}_eps{eps:g}"


def cell_done(folder: str | Path, method: str, layer: int, eps: float) -> bool:
    """Whether the cell's files are complete (the JSON half is written last)."""
    tensor_path, meta_path = result_paths(Path(folder) / "cells" / cell_name(method, layer, eps))
    return tensor_path.is_file() and meta_path.is_file()


@dataclass
class RedteamResult:
    """A run folder loaded: settings, the unperturbed baseline and every finished cell."""

    config: dict[str, Any]
    base: dict[str, Any]
    cells: list[Cell]
    folder: Path | None = None

    @classmethod
    def load(cls, folder: str | Path) -> RedteamResult:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ResultFileError(f"{folder}: no red-teaming run here (config.json is missing)")
        config = read_json(folder / "config.json")
        base = read_json(folder / "base.json") if (folder / "base.json").is_file() else {}
        cells = [Cell.load(p) for p in sorted((folder / "cells").glob("*.json"))]
        return cls(config, base, cells, folder)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        write_json(folder / "config.json", self.config)
        write_json(folder / "base.json", self.base)
        for cell in self.cells:
            cell.save(folder)
        return folder

    def cell(self, method: str, layer: int, eps: float) -> Cell | None:
        for cell in self.cells:
            if cell.method == method and cell.layer == layer and cell.eps == eps:
                return cell
        return None

    @property
    def layers(self) -> list[int]:
        return sorted({c.layer for c in self.cells})

    @property
    def eps_values(self) -> list[float]:
        return sorted({c.eps for c in self.cells})

    @property
    def methods(self) -> list[str]:
        return [m for m in METHODS if any(c.method == m for c in self.cells)]
