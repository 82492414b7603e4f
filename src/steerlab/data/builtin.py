"""Small datasets written for steerlab (original sentences), shipped as package data in `builtin/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steerlab.data.contrast import load_caa_json
from steerlab.data.errors import DataFormatError, read_json
from steerlab.data.texts import load_paired_texts, load_prompts

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

_DESCRIPTIONS = {
    "sentiment": "PairedTexts: the same first-person sentence written happy / miserable",
    "sentiment-prompts": "PromptSet: neutral sentence starts whose next word is an evaluative adjective",
    "sentiment-words": "dict[str, list[str]]: single positive / negative evaluative words",
    "sentiment-ab": "ABDataset: which reply is more cheerful (matching = the cheerful one), letters balanced",
    "neutral-text": "list[str]: plain neutral factual sentences (perplexity side effects)",
    "near-miss": "dict[str, list[str]]: harmless requests worded like harmful ones; 'train', 'val' (for choosing settings) and held-out 'test'",
}


def list_builtin() -> dict[str, str]:
    """Name -> one-line description of every built-in dataset."""
    return dict(_DESCRIPTIONS)


def _word_lists(path: Path) -> dict[str, list[str]]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(data).__name__}")
    for key, words in data.items():
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise DataFormatError(path, "expected a list of non-empty strings", field=key)
    return {key: list(words) for key, words in data.items()}


def _string_list(path: Path) -> list[str]:
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
        raise DataFormatError(path, "expected a JSON list of strings")
    return list(data)


def load_builtin(name: str) -> Any:
    """Load a built-in dataset by name (see `list_builtin`) as its natural type."""
    if name not in _DESCRIPTIONS:
        raise KeyError(f"no built-in dataset {name!r}; available: {', '.join(_DESCRIPTIONS)}")
    path = BUILTIN_DIR / f"{name}.json"
    if name == "sentiment":
        return load_paired_texts(path, name=name)
    if name == "sentiment-prompts":
        return load_prompts(path, name=name)
    if name == "sentiment-ab":
        return load_caa_json(path, name=name)
    if name in ("sentiment-words", "near-miss"):
        return _word_lists(path)
    return _string_list(path)
