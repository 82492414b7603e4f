"""Experiment files: one JSON (or YAML) file that describes a steering experiment, so its contrast data,
evaluation data, word lists, layers and strengths travel together instead of in several options.

Example (every key is optional; relative paths are relative to the experiment file's folder):

    {
      "model": "smollm2-135m",
      "contrast": {"positive": ["I love this."], "negative": ["I hate this."]},
      "evaluation": "prompts.txt",
      "words": {"positive": ["great"], "negative": ["awful"]},
      "layers": [12, 16], "layer": 16,
      "fraction": 0.1, "fractions": [-0.1, 0.1],
      "positions": "all"
    }

Data fields (`contrast` for extraction, `evaluation` for evaluate / sweep) take a spec (`builtin:NAME`,
`caa:BEHAVIOUR[/SPLIT]` or a file), `{"path": ..., "split": "train", "limit": 100}`, paired texts
`{"positive": [...], "negative": [...]}` or a list of prompt strings. Every error names the file and key.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from steerlab.data.builtin import BUILTIN_DIR
from steerlab.data.errors import DataFormatError, check_file, read_json, read_text
from steerlab.data.sources import SPLITS, DataRef, load_texts, load_word_lists, word_lists
from steerlab.data.texts import PairedTexts, PromptSet
from steerlab.errors import UserError
from steerlab.options import check_at_least, check_choice, parse_floats, parse_layers

EXAMPLES = {"sentiment": BUILTIN_DIR / "experiments" / "sentiment.json"}
"""Built-in experiments, named as `--experiment builtin:NAME`."""


@dataclass
class Experiment:
    """What an experiment file says (None where it says nothing); data and word lists are validated."""

    path: Path | None = None
    description: str | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    contrast: DataRef | None = None
    evaluation: DataRef | None = None
    words: dict[str, list[str]] | None = None
    neutral: list[str] | None = None
    prompts: list[str] | None = None
    vector: str | None = None
    layers: list[int] | None = None
    layer: int | None = None
    fraction: float | None = None
    multiplier: float | None = None
    fractions: list[float] | None = None
    multipliers: list[float] | None = None
    positions: str | None = None
    read: str | None = None
    chat: bool | None = None
    system_prompt: str | None = None


KEYS = tuple(f.name for f in fields(Experiment) if f.name != "path")


class _Reader:
    """Validates one experiment file's values; errors name the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent

    def fail(self, key: str, message: str) -> DataFormatError:
        return DataFormatError(self.path, message, field=key)

    def file(self, key: str, value: str) -> str:
        """A spec as written (`builtin:`, `caa:`) or a path resolved against the file's folder."""
        if value.startswith(("builtin:", "caa:")):
            return value
        resolved = self.base / Path(value).expanduser()
        if not resolved.exists():
            raise self.fail(key, f"no such file: {resolved}")
        return str(resolved)

    def string(self, key: str, value: Any, choices: tuple[str, ...] = ()) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return self.checked(key, check_choice, value, choices) if choices else value

    def checked(self, key: str, check: Callable, *args: Any) -> Any:
        """`check(*args, key)` (a checker of `steerlab.options`), its error naming this file and key."""
        try:
            return check(*args, key)
        except UserError as error:
            raise self.fail(key, str(error).removeprefix(f"{key}: ")) from None

    def number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {value!r}")
        return float(value)

    def integer(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}")
        return value

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def numbers(self, key: str, value: Any, parse: Callable[[str], list], check: Callable) -> list:
        """A list of numbers (each passed through `check`), or a string in the command-line syntax."""
        if isinstance(value, str):
            try:
                return parse(value)
            except UserError as error:
                raise self.fail(key, str(error).split(": ", 1)[-1]) from None
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"expected a non-empty list of numbers, got {value!r}")
        return [check(f"{key}[{i}]", v) for i, v in enumerate(value)]

    def layers(self, key: str, value: Any) -> list[int]:
        return self.numbers(key, value, parse_layers, self.integer)

    def floats(self, key: str, value: Any) -> list[float]:
        return self.numbers(key, value, lambda text: parse_floats(text, key), self.number)

    def output(self, key: str, value: Any) -> str:
        return str(self.base / Path(self.string(key, value)).expanduser())

    def texts(self, key: str, value: Any) -> list[str]:
        if isinstance(value, str):
            return load_texts(self.file(key, value), option=f"{self.path}: {key}")
        if not isinstance(value, list) or not value:
            raise self.fail(key, "expected a file name or a non-empty list of strings")
        return [self.string(f"{key}[{i}]", text) for i, text in enumerate(value)]

    def words(self, key: str, value: Any) -> dict[str, list[str]]:
        if isinstance(value, str):
            return load_word_lists(self.file(key, value), option=f"{self.path}: {key}")
        return word_lists(value, self.path, key)

    def data(self, key: str, value: Any) -> DataRef:
        if isinstance(value, str):
            return DataRef(self.file(key, value))
        if isinstance(value, list):
            if value and not all(isinstance(v, str) for v in value):
                raise self.fail(
                    key, "an inline list holds prompt strings; put A/B items in a .json/.jsonl file"
                )
            return DataRef(PromptSet(self.texts(key, value), name=f"{self.path.stem}:{key}"))
        if isinstance(value, dict) and "path" in value:
            unknown = sorted(set(value) - {"path", "split", "limit"})
            if unknown:
                raise self.fail(key, f"unknown key {unknown[0]!r} (use path, split, limit)")
            split = (
                None if value.get("split") is None else self.string(f"{key}.split", value["split"], SPLITS)
            )
            limit = None if value.get("limit") is None else self.integer(f"{key}.limit", value["limit"])
            self.checked(f"{key}.limit", check_at_least, limit, 1)
            return DataRef(self.file(f"{key}.path", self.string(f"{key}.path", value["path"])), split, limit)
        if isinstance(value, dict) and set(value) == {"positive", "negative"}:
            positive = self.texts(f"{key}.positive", value["positive"])
            negative = self.texts(f"{key}.negative", value["negative"])
            if len(positive) != len(negative):
                msg = f"has {len(negative)} texts but 'positive' has {len(positive)}; the lists are paired"
                raise self.fail(f"{key}.negative", msg)
            return DataRef(PairedTexts(positive, negative, name=f"{self.path.stem}:{key}"))
        raise self.fail(
            key,
            'expected a file name, {"path": ..., "split": ..., "limit": ...}, '
            '{"positive": [...], "negative": [...]} or a list of prompts',
        )


def _parse(path: Path) -> Any:
    if path.suffix.lower() not in (".yaml", ".yml"):
        return read_json(path)
    import yaml

    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = None if mark is None else mark.line + 1
        raise DataFormatError(path, f"invalid YAML: {getattr(error, 'problem', error)}", line=line) from None


def load_experiment(spec: str | os.PathLike) -> Experiment:
    """Read and validate an experiment file (`.json`, `.yaml`/`.yml`, or `builtin:NAME` from `EXAMPLES`)."""
    if isinstance(spec, str) and spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in EXAMPLES:
            raise UserError(
                f"--experiment: no built-in experiment {name!r}; available: {', '.join(EXAMPLES)}"
            )
        spec = EXAMPLES[name]
    path = check_file(spec, "--experiment")
    content = _parse(path)
    if not isinstance(content, dict):
        raise DataFormatError(
            path, f"expected an object of experiment settings, got {type(content).__name__}"
        )
    unknown = sorted(set(content) - set(KEYS))
    if unknown:
        raise DataFormatError(path, f"unknown key; the keys are {', '.join(KEYS)}", field=unknown[0])
    reader = _Reader(path)
    readers = {
        "contrast": reader.data,
        "evaluation": reader.data,
        "words": reader.words,
        "neutral": reader.texts,
        "prompts": reader.texts,
        "vector": reader.output,
        "layers": reader.layers,
        "layer": reader.integer,
        "fraction": reader.number,
        "multiplier": reader.number,
        "fractions": reader.floats,
        "multipliers": reader.floats,
        "read": lambda key, value: reader.string(key, value, ("last", "mean")),
        "chat": reader.boolean,
    }
    values = {}
    for key, value in content.items():
        if value is None:
            continue
        values[key] = readers.get(key, reader.string)(key, value)
    for pair in (("fraction", "multiplier"), ("fractions", "multipliers")):
        if all(key in values for key in pair):
            raise DataFormatError(path, f"give {pair[0]!r} or {pair[1]!r}, not both", field=pair[1])
    return Experiment(path=path, **values)


__all__ = ["EXAMPLES", "KEYS", "Experiment", "load_experiment"]
