"""Index-paired free texts (positive / negative) and open-ended prompt sets, with their loaders."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from steerlab.data.errors import DataFormatError, get_str, read_json, read_jsonl, read_text
from steerlab.data.splitting import fingerprint, split_indices


@dataclass
class PairedTexts:
    """Texts that show a property (`positive`) and matched texts that do not (`negative`), paired by index."""

    positive: list[str]
    negative: list[str]
    name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.positive) != len(self.negative):
            raise ValueError(
                f"PairedTexts: {len(self.positive)} positive but {len(self.negative)} negative texts"
            )

    def __len__(self) -> int:
        return len(self.positive)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(zip(self.positive, self.negative))

    def __getitem__(self, index: int | slice) -> tuple[str, str] | PairedTexts:
        if not isinstance(index, slice):
            return self.positive[index], self.negative[index]
        return replace(self, positive=self.positive[index], negative=self.negative[index])

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the two lists."""
        return fingerprint({"positive": self.positive, "negative": self.negative})

    def split(self, fractions: Sequence[float], seed: int = 0) -> tuple[PairedTexts, ...]:
        """Shuffled (seeded), disjoint parts that keep the pairs together; sizes sum to len(self)."""
        parts = split_indices(len(self), fractions, seed)
        return tuple(
            replace(self, positive=[self.positive[i] for i in p], negative=[self.negative[i] for i in p])
            for p in parts
        )


@dataclass
class PromptSet:
    """Open-ended prompts, optionally each with a reference (gold) passage."""

    prompts: list[str]
    references: list[str] | None = None
    name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.references is not None and len(self.references) != len(self.prompts):
            raise ValueError(f"PromptSet: {len(self.prompts)} prompts but {len(self.references)} references")

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __getitem__(self, index: int | slice) -> str | PromptSet:
        if not isinstance(index, slice):
            return self.prompts[index]
        refs = None if self.references is None else self.references[index]
        return replace(self, prompts=self.prompts[index], references=refs)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the prompts and references."""
        return fingerprint({"prompts": self.prompts, "references": self.references})

    def split(self, fractions: Sequence[float], seed: int = 0) -> tuple[PromptSet, ...]:
        """Shuffled (seeded), disjoint parts; references follow their prompts; sizes sum to len(self)."""
        parts = split_indices(len(self), fractions, seed)
        refs = self.references
        return tuple(
            replace(
                self,
                prompts=[self.prompts[i] for i in p],
                references=None if refs is None else [refs[i] for i in p],
            )
            for p in parts
        )


def _string_list(path: Path, value: Any, key: str) -> list[str]:
    """A JSON list of non-empty strings stored under `key`."""
    if not isinstance(value, list):
        raise DataFormatError(path, f"expected a list of strings, got {type(value).__name__}", field=key)
    for i, text in enumerate(value):
        if not isinstance(text, str) or not text.strip():
            got = repr(text) if isinstance(text, str) else type(text).__name__
            raise DataFormatError(path, f"expected a non-empty string, got {got}", field=f"{key}[{i}]")
    return value


def load_paired_texts(path: str | os.PathLike, name: str | None = None) -> PairedTexts:
    """Load {"positive": [...], "negative": [...]} (JSON), or a list / JSONL lines of {"positive", "negative"}."""
    path = Path(path)
    name = path.stem if name is None else name
    if path.suffix.lower() == ".jsonl":
        records = [(n, obj, {"line": n}) for n, obj in read_jsonl(path)]
    else:
        data = read_json(path)
        if isinstance(data, dict):
            for key in ("positive", "negative"):
                if key not in data:
                    raise DataFormatError(path, f"missing (the object has {sorted(data)})", field=key)
            positive = _string_list(path, data["positive"], "positive")
            negative = _string_list(path, data["negative"], "negative")
            if len(positive) != len(negative):
                msg = f"has {len(negative)} texts but 'positive' has {len(positive)}; the lists are paired by index"
                raise DataFormatError(path, msg, field="negative")
            if not positive:
                raise DataFormatError(path, "the lists hold no texts")
            return PairedTexts(list(positive), list(negative), name, str(path))
        if not isinstance(data, list):
            raise DataFormatError(
                path, f"expected a JSON object or list at the top level, got {type(data).__name__}"
            )
        records = [(i, obj, {"record": i}) for i, obj in enumerate(data)]
    if not records:
        raise DataFormatError(path, "the file holds no pairs")
    positive = [get_str(path, obj, "positive", loc) for _, obj, loc in records]
    negative = [get_str(path, obj, "negative", loc) for _, obj, loc in records]
    return PairedTexts(positive, negative, name, str(path))  # type: ignore[arg-type]


def _prompt_records(path: Path, records: list[tuple[Any, dict[str, int]]]) -> PromptSet:
    """Prompts from JSON strings or objects with "prompt"/"instruction"/"question" and an optional
    "reference"."""
    prompts: list[str] = []
    references: list[str | None] = []
    for obj, loc in records:
        if isinstance(obj, str):
            if not obj.strip():
                raise DataFormatError(path, "the prompt is empty", **loc)
            prompts.append(obj)
            references.append(None)
            continue
        key = next((k for k in ("prompt", "instruction") if isinstance(obj, dict) and k in obj), "question")
        prompts.append(get_str(path, obj, key, loc))  # type: ignore[arg-type]
        references.append(get_str(path, obj, "reference", loc, optional=True))
    given = [r is not None for r in references]
    if any(given) and not all(given):
        first = given.index(False)
        raise DataFormatError(
            path, "missing here but given for other prompts", field="reference", **records[first][1]
        )
    return PromptSet(prompts, references if all(given) else None, path.stem)  # type: ignore[arg-type]


def load_prompts(path: str | os.PathLike, name: str | None = None) -> PromptSet:
    """Load open-ended prompts.

    Accepted: a JSON list of strings or of objects with "question" (CAA test_open_ended), "prompt" or
    "instruction" (refusal-direction splits) and an optional "reference"; JSONL lines of such objects (or strings); any other file as plain text, one prompt
    per non-blank line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = _prompt_records(path, [(obj, {"line": n}) for n, obj in read_jsonl(path)])
    elif suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise DataFormatError(path, f"expected a JSON list at the top level, got {type(data).__name__}")
        if not data:
            raise DataFormatError(path, "the list holds no prompts")
        prompts = _prompt_records(path, [(obj, {"record": i}) for i, obj in enumerate(data)])
    else:
        lines = [line.rstrip("\r") for line in read_text(path).split("\n")]
        prompts = PromptSet([line for line in lines if line.strip()], None, path.stem)
    return replace(prompts, name=prompts.name if name is None else name, source=str(path))
