"""Cloze items: a stem whose next word is one of a few choices (scored by the choices' first tokens, so a
model is judged on content, not on the answer letter it happens to prefer)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from steerlab.data.errors import DataFormatError, check_file


@dataclass(frozen=True)
class ClozeItem:
    """A stem ("The capital of France is"), its choices (["Rome", "Paris", ...]) and the right one's index."""

    stem: str
    choices: tuple[str, ...]
    answer: int


def load_cloze(path: str | os.PathLike) -> list[ClozeItem]:
    """Cloze items from a JSON list of {"stem": str, "choices": [str, ...], "answer": int}."""
    path = check_file(path)
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise DataFormatError(path, f"not valid JSON ({error.msg})", line=error.lineno) from None
    if not isinstance(data, list) or not data:
        raise DataFormatError(path, "expected a non-empty JSON list of cloze items")
    items = []
    for index, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise DataFormatError(path, "expected an object with stem, choices and answer", record=index)
        stem, choices, answer = raw.get("stem"), raw.get("choices"), raw.get("answer")
        if not isinstance(stem, str) or not stem.strip():
            raise DataFormatError(path, "expected a non-empty string", record=index, field="stem")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise DataFormatError(
                path, "expected two or more non-empty strings", record=index, field="choices"
            )
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataFormatError(
                path,
                f"expected the index of the right choice, 0..{len(choices) - 1}",
                record=index,
                field="answer",
            )
        items.append(ClozeItem(stem, tuple(choices), answer))
    return items
