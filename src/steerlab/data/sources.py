"""Datasets named by a string (`builtin:NAME`, `caa:BEHAVIOUR[/SPLIT]` or a file), their format detected
from the content, read with the validated loaders; word lists, plain text lists, named splits and limits.

Every error is a `UserError` naming the option (e.g. `--data`) or the file, line and field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlab.data.builtin import list_builtin, load_builtin
from steerlab.data.contrast import ABDataset, load_anthropic_jsonl, load_caa_json
from steerlab.data.errors import DataFormatError, check_file, read_json, read_jsonl
from steerlab.data.fetch import CAA_BEHAVIOURS, CAA_SPLITS, IntegrityError, load_caa
from steerlab.data.texts import PairedTexts, PromptSet, load_paired_texts, load_prompts
from steerlab.errors import UserError
from steerlab.options import check_at_least, check_choice

Dataset = ABDataset | PairedTexts | PromptSet
DATASET_TYPES = (ABDataset, PairedTexts, PromptSet)

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
"""`--split NAME` takes this part of a seeded shuffle of the dataset (seed 0 unless given)."""

KIND_NAMES = {
    ABDataset: "A/B items",
    PairedTexts: "paired texts",
    PromptSet: "prompts",
    dict: "word lists",
    list: "texts",
}


@dataclass(frozen=True)
class DataRef:
    """Where a dataset comes from (a spec string, a path or a loaded dataset) and which part of it to use."""

    source: str | os.PathLike | Dataset
    split: str | None = None
    limit: int | None = None

    def describe(self) -> str:
        if isinstance(self.source, DATASET_TYPES):
            return self.source.name or type(self.source).__name__
        return str(self.source)


def _builtin(name: str, option: str) -> Any:
    if name not in list_builtin():
        raise UserError(f"{option}: no built-in dataset {name!r}; available: {', '.join(list_builtin())}")
    return load_builtin(name)


def _caa(spec: str, option: str) -> Dataset:
    behaviour, _, split = spec.partition("/")
    split = split or "generate"
    if split not in CAA_SPLITS:
        raise UserError(
            f"{option}: unknown CAA split {split!r} in {spec!r}; use one of {', '.join(CAA_SPLITS)}"
        )
    if behaviour not in CAA_BEHAVIOURS:
        raise UserError(f"{option}: no CAA behaviour {behaviour!r}; use one of {', '.join(CAA_BEHAVIOURS)}")
    try:
        return load_caa(behaviour, split)
    except (OSError, IntegrityError) as error:  # no network, or a download that failed verification
        raise UserError(f"{option}: {error}") from None


def detect_kind(path: Path) -> type:
    """Which dataset a .json/.jsonl file holds, from its first record: ABDataset, PairedTexts or PromptSet.

    Other files are prompts (plain text, one per line). Malformed files raise `DataFormatError`.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        first = next(read_jsonl(path), (0, None))[1]
    elif suffix == ".json":
        content = read_json(path)
        if isinstance(content, dict):
            return PairedTexts if "positive" in content or "negative" in content else PromptSet
        first = content[0] if isinstance(content, list) and content else None
    else:
        return PromptSet
    if isinstance(first, dict) and "answer_matching_behavior" in first:
        return ABDataset
    if isinstance(first, dict) and ("positive" in first or "negative" in first):
        return PairedTexts
    return PromptSet


def load_file(path: str | os.PathLike, option: str = "--data") -> Dataset:
    """Load a data file of any supported format: CAA .json / Anthropic .jsonl A/B items, paired texts, prompts."""
    path = check_file(path, option)
    kind = detect_kind(path)
    if kind is ABDataset:
        return load_anthropic_jsonl(path) if path.suffix.lower() == ".jsonl" else load_caa_json(path)
    if kind is PairedTexts:
        return load_paired_texts(path)
    return load_prompts(path)


def select(dataset: Dataset, split: str | None = None, limit: int | None = None, seed: int = 0) -> Dataset:
    """The named split (`SPLITS`, fractions `SPLIT_FRACTIONS`, seeded) of `dataset`, then its first `limit` items."""
    if split is not None:
        check_choice(split, SPLITS, "--split")
        dataset = dataset.split(SPLIT_FRACTIONS, seed=seed)[SPLITS.index(split)]
    if limit is not None:
        check_at_least(limit, 1, "--limit")
        dataset = dataset[:limit]
    if len(dataset) == 0:
        raise UserError(f"--split {split}: the split holds no items (the dataset is too small)")
    return dataset


def load_dataset(
    ref: DataRef | str | os.PathLike | Dataset,
    expect: tuple[type, ...] = DATASET_TYPES,
    option: str = "--data",
    purpose: str = "this command",
) -> Dataset:
    """The dataset `ref` names, checked to be one of the `expect` kinds, with its split and limit applied.

    A spec is `builtin:NAME`, `caa:BEHAVIOUR[/generate|test_ab|test_open_ended]` (downloaded once, pinned)
    or a file path; a loaded dataset passes through.
    """
    if not isinstance(ref, DataRef):
        ref = DataRef(ref)
    source = ref.source
    if isinstance(source, DATASET_TYPES):
        dataset = source
    elif isinstance(source, str) and source.startswith("builtin:"):
        dataset = _builtin(source.removeprefix("builtin:"), option)
    elif isinstance(source, str) and source.startswith("caa:"):
        dataset = _caa(source.removeprefix("caa:"), option)
    else:
        dataset = load_file(source, option)
    if not isinstance(dataset, expect):
        got = KIND_NAMES.get(type(dataset), type(dataset).__name__)
        wanted = " or ".join(KIND_NAMES[kind] for kind in expect)
        raise UserError(f"{option}: {ref.describe()} holds {got}; {purpose} needs {wanted}")
    return select(dataset, ref.split, ref.limit)


def word_lists(value: Any, file: str | os.PathLike, key: str = "") -> dict[str, list[str]]:
    """Validate {"positive": [...], "negative": [...]}: two lists of single words (their first token is scored).

    `file` and `key` (a field inside it, for inline lists) locate errors.
    """
    prefix = f"{key}." if key else ""
    if not isinstance(value, dict):
        raise DataFormatError(
            file, f"expected an object with word lists 'positive' and 'negative', got {type(value).__name__}"
        )
    lists = {}
    for name in ("positive", "negative"):
        if name not in value:
            raise DataFormatError(file, f"missing (the object has {sorted(value)})", field=prefix + name)
        words = value[name]
        if not isinstance(words, list) or not words:
            raise DataFormatError(file, "expected a non-empty list of words", field=prefix + name)
        for i, word in enumerate(words):
            if not isinstance(word, str) or not word.strip():
                raise DataFormatError(file, "expected a non-empty string", field=f"{prefix}{name}[{i}]")
            if len(word.split()) > 1:
                raise DataFormatError(
                    file,
                    f"expected a single word, got {word!r} (is this a file of paired texts?)",
                    field=f"{prefix}{name}[{i}]",
                )
        lists[name] = list(words)
    return lists


def load_word_lists(spec: str | os.PathLike, option: str = "--words") -> dict[str, list[str]]:
    """Word lists from `builtin:sentiment-words` or a JSON file {"positive": [...], "negative": [...]}."""
    if isinstance(spec, str) and spec.startswith("builtin:"):
        return word_lists(_builtin(spec.removeprefix("builtin:"), option), spec)
    path = check_file(spec, option)
    return word_lists(read_json(path), path)


def load_texts(spec: str | os.PathLike, option: str = "--neutral") -> list[str]:
    """Texts from `builtin:NAME` or a file: one per non-blank line, or a JSON(L) list of strings / prompts."""
    if isinstance(spec, str) and spec.startswith("builtin:"):
        value = _builtin(spec.removeprefix("builtin:"), option)
        if isinstance(value, PromptSet):
            return value.prompts
        if not isinstance(value, list):
            raise UserError(f"{option}: {spec} holds {KIND_NAMES[type(value)]}, not texts")
        return value
    return load_prompts(check_file(spec, option)).prompts


__all__ = [
    "DATASET_TYPES",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "DataRef",
    "Dataset",
    "detect_kind",
    "load_dataset",
    "load_file",
    "load_texts",
    "load_word_lists",
    "select",
    "word_lists",
]


def data_root() -> Path:
    """Where relative data paths are read: $STEERLAB_DATA, else the `shared/data` folder beside the checkout."""
    env = os.environ.get("STEERLAB_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "shared" / "data"
