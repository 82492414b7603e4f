"""Argument syntax shared by the Python API and every command: dtypes, layer lists, number lists."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch

from steerlab.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None, option: str = "--dtype") -> torch.dtype | None:
    """'float32' -> torch.float32 (None stays None); an unknown name is a `UserError` naming `option`."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"{option}: unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def parse_layers(text: str | None, option: str = "--layers") -> list[int] | None:
    """'24-29' -> [24..29]; '0,3,-1' -> [0, 3, -1]; None/'all' -> None (every layer)."""
    if text is None or text.strip() == "all":
        return None
    out: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if "-" in part[1:]:
                cut = part.index("-", 1)
                out.extend(range(int(part[:cut]), int(part[cut + 1 :]) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise UserError(f"{option}: cannot read {text!r}; use e.g. 12,16 or 24-29 or -1") from None
    if not out:
        raise UserError(f"{option}: no layer given in {text!r}")
    return out


def parse_floats(text: str, option: str) -> list[float]:
    """'-0.1,0.05' -> [-0.1, 0.05]."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"{option}: cannot read {text!r}; use comma-separated numbers, e.g. -0.1,0.1"
        ) from None
    if not values:
        raise UserError(f"{option}: no number given")
    return values


@dataclass(kw_only=True)
class ModelArgs:
    """Which model to load (the fields of `add_model_arguments`), and whether to show progress bars."""

    model: str = "smollm2-135m"
    device: str | None = None
    dtype: str | None = None
    progress: bool = True

    def load(self, **kwargs):
        """The `LoadedModel` these arguments name; without progress, transformers' bars stay off too."""
        from transformers.utils import logging as hf_logging

        from steerlab.models import load_model

        logging.getLogger("steerlab").info("loading model %s", self.model)
        shown = hf_logging.is_progress_bar_enabled()
        if not self.progress:
            hf_logging.disable_progress_bar()
        try:
            return load_model(self.model, device=self.device, dtype=parse_dtype(self.dtype), **kwargs)
        finally:
            if shown:
                hf_logging.enable_progress_bar()


def add_model_arguments(parser: argparse.ArgumentParser, dtype_default: str | None = None) -> None:
    """--model, --device and --dtype, the same for every command that loads a model."""
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="embedded name (smollm2-135m, gemma3-270m), .gguf file, local folder or hub id",
    )
    parser.add_argument(
        "--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: where the model loads)"
    )
    parser.add_argument(
        "--dtype", default=dtype_default, choices=sorted(DTYPES), help="weights' dtype (default float32)"
    )
