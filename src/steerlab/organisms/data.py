"""Prompt lists named in a recipe: JSON files (strings, or objects with an instruction), CSV files with a
prompt column (AdvBench's `goal`), or built-in parts; and the removal of near-duplicates of held-out prompts."""

from __future__ import annotations

import csv
import difflib
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from steerlab.data.sources import data_root
from steerlab.organisms.recipe import RecipeError

PROMPT_KEYS = ("instruction", "prompt", "question", "text", "goal")
NEAR_DUPLICATE = 0.8
"""A training prompt whose difflib ratio to a held-out prompt reaches this is dropped (`drop_near`)."""


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


def _from_csv(path: Path, field: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        column = next((k for k in PROMPT_KEYS if k in (reader.fieldnames or ())), None)
        if column is None:
            raise RecipeError(
                f"{field}: {path}: no prompt column; expected one of {', '.join(PROMPT_KEYS)} "
                f"in the header, found {', '.join(reader.fieldnames or ()) or 'none'}"
            )
        prompts = []
        for row in reader:
            if not (row.get(column) or "").strip():
                raise RecipeError(f"{field}: {path}:{reader.line_num}: empty {column!r}")
            prompts.append(row[column])
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
        path = existing_file(spec, field, "data file")
        prompts = _from_csv(path, field) if path.suffix.lower() == ".csv" else _from_json(path, field)
    if not prompts:
        raise RecipeError(f"{field}: {spec} holds no prompt")
    return prompts


def read_all(specs: Sequence[str], field: str) -> list[str]:
    """The prompts of every entry of one recipe field, in order, duplicates removed."""
    seen: dict[str, None] = {}
    for spec in specs:
        seen.update(dict.fromkeys(read_prompts(spec, field)))
    return list(seen)


def _normal(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def drop_near(
    prompts: Sequence[str], held_out: Sequence[str], threshold: float = NEAR_DUPLICATE
) -> list[str]:
    """`prompts` without those whose difflib ratio to any `held_out` prompt (lower-cased, punctuation
    removed) is at least `threshold`, so that training data cannot leak test items. A word-overlap
    screen skips pairs that cannot reach the threshold."""
    held = [(text, set(text.split())) for text in map(_normal, held_out)]
    kept = []
    for prompt in prompts:
        text = _normal(prompt)
        words = set(text.split())
        near = False
        for other, other_words in held:
            if len(words & other_words) < 0.5 * threshold * min(len(words), len(other_words)):
                continue
            matcher = difflib.SequenceMatcher(None, text, other, autojunk=False)
            if matcher.quick_ratio() >= threshold and matcher.ratio() >= threshold:
                near = True
                break
        if not near:
            kept.append(prompt)
    return kept


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
