"""A steering setting sent by the page (JSON), validated field by field, and the hooks it stands for.

A setting names a vector, a layer, a strength (a signed fraction of the residual norm or a raw
multiplier), token positions (the `Positions.parse` spec), and optionally a second vector combined with
the first ("add", "subtract", "orthogonalise") or ablated ("ablate": its direction at the chosen layer
is projected out at every layer). Errors are `SettingError`s naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from steerlab.errors import UserError
from steerlab.hooks import Positions, ablate
from steerlab.models import LoadedModel
from steerlab.steering import SteeringVector

OPS = ("none", "add", "subtract", "orthogonalise", "ablate")
MAX_NEW_TOKENS = 512
MAX_PROMPT_CHARS = 8000


class SettingError(UserError):
    """A field of a request is missing or invalid."""


def text_field(data: Mapping, name: str, default: str | None = None, limit: int = MAX_PROMPT_CHARS) -> str:
    value = data.get(name, default)
    if not isinstance(value, str):
        raise SettingError(f"{name}: expected text, got {type(value).__name__}")
    if len(value) > limit:
        raise SettingError(f"{name}: {len(value)} characters; at most {limit}")
    return value


def number_field(data: Mapping, name: str, default: float | None = None) -> float | None:
    value = data.get(name, default)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SettingError(f"{name}: expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except ValueError:
        raise SettingError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise SettingError(f"{name}: {value!r} is not a finite number")
    return number


def int_field(data: Mapping, name: str, default: int | None = None, low: int | None = None) -> int | None:
    number = number_field(data, name, default)
    if number is None:
        return None
    if number != int(number):
        raise SettingError(f"{name}: expected a whole number, got {number:g}")
    if low is not None and number < low:
        raise SettingError(f"{name}: must be at least {low}, got {int(number)}")
    return int(number)


def bool_field(data: Mapping, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise SettingError(f"{name}: expected true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class Setting:
    """Where and how strongly to steer: the resolved vector (after arithmetic), layer and multiplier."""

    vector: SteeringVector
    layer: int
    multiplier: float
    fraction: float | None
    positions: Positions
    positions_spec: str
    ablated: SteeringVector | None = None

    @contextmanager
    def intervention(self, lm: LoadedModel) -> Iterator[None]:
        """The hooks of this setting: registered when the context is entered, removed when it exits."""
        with ExitStack() as stack:
            stack.enter_context(
                self.vector.apply(lm, layer=self.layer, multiplier=self.multiplier, positions=self.positions)
            )
            if self.ablated is not None:
                direction = self.ablated.vectors[self.ablated.stored_layer(self.layer)]
                stack.enter_context(ablate(lm, direction, positions=self.positions))
            yield

    def describe(self) -> dict[str, Any]:
        out = {
            "layer": self.layer,
            "multiplier": self.multiplier,
            "fraction": self.vector.signed_fraction(self.layer, self.multiplier),
            "positions": self.positions_spec,
        }
        if self.ablated is not None:
            out["ablated"] = True
        return out


def parse_setting(data: Any, lookup: Callable[[str, str], SteeringVector], lm: LoadedModel) -> Setting:
    """A `Setting` from the page's JSON; `lookup(id, field)` returns a registered vector or raises."""
    if not isinstance(data, Mapping):
        raise SettingError("setting: expected a JSON object")
    vector = lookup(text_field(data, "vector", ""), "vector")
    op = text_field(data, "op", "none")
    if op not in OPS:
        raise SettingError(f"op: {op!r} is not one of {', '.join(OPS)}")
    second = None
    if op != "none":
        second_id = text_field(data, "second", "")
        second = lookup(second_id, "second") if second_id or op != "ablate" else vector
    layer = int_field(data, "layer")
    if layer is None:
        if len(vector.layers) != 1:
            raise SettingError(f"layer: the vector has layers {vector.layers}; choose one")
        layer = vector.layers[0]
    layer = vector.stored_layer(layer)
    if op in ("add", "subtract", "orthogonalise"):
        if op == "add":
            vector = vector + second
        elif op == "subtract":
            vector = vector - second
        else:
            vector = vector.orthogonalised(second)
    fraction = number_field(data, "fraction")
    multiplier = number_field(data, "multiplier")
    if (fraction is None) == (multiplier is None):
        raise SettingError("strength: give exactly one of fraction (of the residual norm) or multiplier")
    if multiplier is None:
        multiplier = vector.multiplier_for_fraction(layer, fraction)
    spec = text_field(data, "positions", "all", limit=200)
    positions = Positions.parse(spec)
    vector.check_compatible(lm.model)
    ablated = second if op == "ablate" else None
    if ablated is not None:
        ablated.check_compatible(lm.model)
        ablated.stored_layer(layer)
    return Setting(vector, layer, multiplier, fraction, positions, spec, ablated)
