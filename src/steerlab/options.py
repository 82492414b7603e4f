"""Argument syntax shared by the Python API and every command: dtypes, layer lists, number lists, value
checks, and options generated from argument dataclasses (help, choices and defaults come from the fields)."""

from __future__ import annotations

import argparse
import logging
import typing
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

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


def check_choice(value: Any, choices: Collection, option: str, error: type[UserError] = UserError) -> Any:
    """`value` when it is None or one of `choices`; otherwise an `error` naming `option`."""
    if value is not None and value not in choices:
        raise error(f"{option}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def check_at_least(
    value: int | float | None, low: int | float, option: str, error: type[UserError] = UserError
) -> Any:
    """`value` when it is None or at least `low` (1: a positive count); otherwise an `error` naming `option`."""
    if value is not None and value < low:
        raise error(f"{option}: must be at least {low}, got {value}")
    return value


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


MODEL_HELP = "embedded name (smollm2-135m, gemma3-270m), .gguf file, local folder or hub id"


def option(
    help: str = "",
    *,
    flag: str | None = None,
    choices: Collection | None = None,
    required: bool = False,
    parse: Callable[[str], Any] | None = None,
    nargs: str | None = None,
    append: bool = False,
    saved: bool = True,
    cli: bool = True,
) -> dict[str, Any]:
    """Field metadata read by `add_arguments`: help, flag (default `--field-name`), choices, required,
    `parse` (argparse's type; default from the annotation), nargs, `append` (repeatable option),
    `saved` (kept in a run's config) and `cli` (False: no option)."""
    return {
        "help": help,
        "flag": flag,
        "choices": choices,
        "required": required,
        "parse": parse,
        "nargs": nargs,
        "append": append,
        "saved": saved,
        "cli": cli,
    }


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass `cls`'s field `name` (MISSING when it has none)."""
    spec = next(f for f in fields(cls) if f.name == name)
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default


def _scalar(hint: Any) -> type:
    """int for `int | None`, str for `list[int] | None` (parsed by the dataclass) or `str | os.PathLike`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    return base if base in (int, float, str, bool) else str


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: Collection[str] = ()) -> None:
    """One option per field of dataclass `cls` (`--block-size` for `block_size`), except those in `skip` or
    marked `cli=False`; help, choices and the default (also shown in the help) come from the field."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = dict(f.metadata)
        if f.name in skip or not meta.get("cli", True):
            continue
        kind = _scalar(hints[f.name])
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = field_default(cls, f.name)
        required = meta.get("required", False) or default is MISSING
        default = None if required else default
        help_ = meta.get("help") or ""
        if kind is bool:
            action = "store_false" if default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, help=help_)
            continue
        if default is not None and "default" not in help_:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            help_ = f"{help_} (default: {shown})".lstrip()
        parser.add_argument(
            flag,
            dest=f.name,
            type=meta.get("parse") or kind,
            default=default,
            required=required,
            choices=meta.get("choices"),
            nargs=meta.get("nargs"),
            action="append" if meta.get("append") else "store",
            help=help_,
        )


def from_namespace(cls: type, namespace: argparse.Namespace, **values: Any):
    """The dataclass `cls` built from parsed options (and `values`), validated by the dataclass."""
    names = {f.name for f in fields(cls)}
    given = {name: value for name, value in vars(namespace).items() if name in names}
    return cls(**{**given, **values})


@dataclass(kw_only=True)
class ModelArgs:
    """Which model to load (the fields of `add_model_arguments`), and whether to show progress bars."""

    model: str = field(default="smollm2-135m", metadata=option(MODEL_HELP))
    device: str | None = field(
        default=None, metadata=option("e.g. cpu, cuda, cuda:1 (default: where the model loads)")
    )
    dtype: str | None = field(
        default=None, metadata=option("weights' dtype (default float32)", choices=sorted(DTYPES))
    )
    progress: bool = field(default=True, metadata=option(cli=False))

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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --device and --dtype, the same for every command that loads a model."""
    add_arguments(parser, ModelArgs)
