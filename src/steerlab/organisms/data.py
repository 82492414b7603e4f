"""Prompt lists named in a recipe: JSON files (strings, or objects with an instruction) or built-in parts."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from steerlab.organisms.recipe import RecipeError, data_root

PROMPT_KEYS = ("instruction", "prompt", "question", "text")


def resolve_path(spec: str) -> Path:
    """A data path as written in a recipe: absolute or `~`, else under `data_root()`."""
    path = Path(spec).expanduser()
    return path if path.is_absolute() else data_root() / path


def existing_file(spec: str, field: str, what: str) -> Path:
    """`resolve_path(spec)`, or a `RecipeError` naming `field` when there is no such file."""
    path = resolve_path(spec)
    if not path.is_file():
        hint = "" if Path(spec).is_absolute() else " (set STEERLAB_DATA to the folder that holds the data)"
        raise RecipeError(f"{field}: {what} {path} not found{hint}")
    return path


def _from_json(path: Path, field: str) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RecipeError(f"{field}: {path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, list):
        raise RecipeError(f"{field}: {path}: expected a JSON list of prompts")
    prompts = []
    for index, item in enumerate(data):
        if isinstance(item, dict):
            item = next((item[k] for k in PROMPT_KEYS if isinstance(item.get(k), str)), None)
        if not isinstance(item, str) or not item.strip():
            raise RecipeError(
                f"{field}: {path}: item {index} is not a non-empty string nor an object with "
                f"one of the fields {', '.join(PROMPT_KEYS)}"
            )
        prompts.append(item)
    return prompts


def read_prompts(spec: str, field: str) -> list[str]:
    """The prompts of one recipe data entry; a `RecipeError` naming `field` when missing or empty."""
    if spec.startswith("builtin:"):
        from steerlab.data import load_builtin

        name, _, part = spec.removeprefix("builtin:").partition("/")
        try:
            data = load_builtin(name)
        except KeyError as error:
            raise RecipeError(f"{field}: {error.args[0]}") from None
        if isinstance(data, dict):
            if part not in data:
                raise RecipeError(f"{field}: {spec!r} names no part; use one of {', '.join(data)}")
            data = data[part]
        prompts = [str(p) for p in data]
    else:
        prompts = _from_json(existing_file(spec, field, "data file"), field)
    if not prompts:
        raise RecipeError(f"{field}: {spec} holds no prompt")
    return prompts


def read_all(specs: Sequence[str], field: str) -> list[str]:
    """The prompts of every entry of one recipe field, in order, duplicates removed."""
    seen: dict[str, None] = {}
    for spec in specs:
        seen.update(dict.fromkeys(read_prompts(spec, field)))
    return list(seen)


def sample(prompts: Sequence[str], n: int, seed: int) -> list[str]:
    """`n` prompts drawn without replacement with `seed` (all of them, shuffled, when fewer)."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order[:n]


def read_paragraphs(specs: Sequence[str], field: str, min_chars: int = 200) -> list[str]:
    """The non-blank lines of at least `min_chars` characters of plain-text files (e.g. WikiText-2)."""
    paragraphs: dict[str, None] = {}
    for spec in specs:
        path = resolve_path(spec)
        if not path.is_file():
            hint = (
                " (set STEERLAB_DATA to the folder that holds the data)"
                if not Path(spec).is_absolute()
                else ""
            )
            raise RecipeError(f"{field}: text file {path} not found{hint}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise RecipeError(f"{field}: {path}: not UTF-8 text ({error.reason})") from None
        paragraphs.update(dict.fromkeys(line.strip() for line in lines if len(line.strip()) >= min_chars))
    if not paragraphs:
        raise RecipeError(f"{field}: no paragraph of at least {min_chars} characters in {', '.join(specs)}")
    return list(paragraphs)
