"""Choose the parameters a curvature operator acts on, and move between flat vectors and tensors."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from steerlab.errors import UserError


class ParameterSelectionError(UserError):
    """No parameter matches a selection (include/exclude patterns, layers)."""


def select_params(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    modules: nn.Module | Iterable[nn.Module] | None = None,
) -> dict[str, nn.Parameter]:
    """Parameters of `model` by name, in registration order.

    `include` / `exclude` are regular expressions searched in the dotted parameter name (a list means
    any of them); `modules` keeps only parameters owned by those submodules. With nothing given, every
    parameter is selected. An empty selection is a `ParameterSelectionError`.
    """
    inc = [include] if isinstance(include, str) else list(include or [])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    owned: set[int] | None = None
    if modules is not None:
        mods = [modules] if isinstance(modules, nn.Module) else list(modules)
        owned = {id(p) for m in mods for p in m.parameters()}
    chosen: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if inc and not any(re.search(pat, name) for pat in inc):
            continue
        if exc and any(re.search(pat, name) for pat in exc):
            continue
        if owned is not None and id(p) not in owned:
            continue
        chosen[name] = p
    if not chosen:
        names = [n for n, _ in model.named_parameters()][:8]
        raise ParameterSelectionError(
            f"no parameter matches include={inc} exclude={exc}"
            + (" in the chosen layers" if modules is not None else "")
            + f"; names look like {names}"
        )
    return chosen


def flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Concatenate `tensors` into one flat vector of `dtype`."""
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped (and typed) like `like`."""
    out, start = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[start : start + n].view(t.shape).to(dtype=t.dtype, device=t.device))
        start += n
    if start != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, parameters have {start}")
    return out


def block_slices(params: dict[str, torch.Tensor]) -> dict[str, slice]:
    """Where each named parameter lives in the flat vector."""
    out, start = {}, 0
    for name, p in params.items():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out
