"""Small datasets written for steerlab (original sentences), shipped as package data in `builtin/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steerlab.data.cloze import load_cloze
from steerlab.data.contrast import load_caa_json
from steerlab.data.errors import DataFormatError, read_json
from steerlab.data.texts import PairedTexts, load_paired_texts, load_prompts

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

_DESCRIPTIONS = {
    "sentiment": "PairedTexts: the same first-person sentence written happy / miserable",
    "sentiment-prompts": "PromptSet: neutral sentence starts whose next word is an evaluative adjective",
    "sentiment-words": "dict[str, list[str]]: single positive / negative evaluative words",
    "sentiment-ab": "ABDataset: which reply is more cheerful (matching = the cheerful one), letters balanced",
    "easy-ab": "ABDataset: easy general-knowledge questions (matching = the right answer), letters alternate",
    "easy-cloze": "list[ClozeItem]: easy general-knowledge stems whose next word is one of four choices",
    "neutral-text": "list[str]: plain neutral factual sentences (perplexity side effects)",
    "near-miss": "dict[str, list[str]]: harmless requests worded like harmful ones; 'train', 'val' (for choosing settings) and held-out 'test'",
    "harmful-extra": "dict[str, list[str]]: harmful requests across hazard categories (refusal training); 'train' and 'val'",
    "pirate-persona": "str: a pirate persona system prompt (distillation into an activation injection)",
    "constitution": "str: a system prompt of twelve numbered house rules (distillation)",
    "distill-prompts": "dict[str, list[str]]: generic user requests split 'train' / 'val' / 'test'",
    "sentiment-pool": "PairedTexts: varied candidate sentiment pairs (words to stories, two null pairs) to search",
    "sentiment-lengths": "dict[int, PairedTexts]: sentiment pairs of 1, 2, 4, ..., 64 tokens (SmolLM2 tokenizer)",
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


def _text(path: Path) -> str:
    data = read_json(path)
    if not isinstance(data, str) or not data.strip():
        raise DataFormatError(path, "expected a non-empty JSON string")
    return data


def load_length_pairs(path: str | Path, name: str = "") -> dict[int, PairedTexts]:
    """{"LENGTH": {"positive": [...], "negative": [...]}, ...} as {length: PairedTexts}, lengths ascending."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise DataFormatError(path, "expected a non-empty JSON object {length: {positive, negative}}")
    groups = {}
    for key, value in data.items():
        if not key.isdigit() or int(key) < 1:
            raise DataFormatError(path, "expected a length of at least 1 token as the key", field=key)
        if not isinstance(value, dict) or set(value) != {"positive", "negative"}:
            raise DataFormatError(path, "expected {'positive': [...], 'negative': [...]}", field=key)
        for side in ("positive", "negative"):
            texts = value[side]
            if (
                not isinstance(texts, list)
                or not texts
                or not all(isinstance(t, str) and t.strip() for t in texts)
            ):
                raise DataFormatError(
                    path, "expected a non-empty list of non-empty strings", field=f"{key}.{side}"
                )
        if len(value["positive"]) != len(value["negative"]):
            raise DataFormatError(path, "the positive and negative lists differ in length", field=key)
        groups[int(key)] = PairedTexts(
            list(value["positive"]), list(value["negative"]), f"{name}/{key}", str(path)
        )
    return dict(sorted(groups.items()))


def load_builtin(name: str) -> Any:
    """Load a built-in dataset by name (see `list_builtin`) as its natural type."""
    if name not in _DESCRIPTIONS:
        raise KeyError(f"no built-in dataset {name!r}; available: {', '.join(_DESCRIPTIONS)}")
    path = BUILTIN_DIR / f"{name}.json"
    if name in ("sentiment", "sentiment-pool"):
        return load_paired_texts(path, name=name)
    if name == "sentiment-lengths":
        return load_length_pairs(path, name)
    if name == "sentiment-prompts":
        return load_prompts(path, name=name)
    if name == "easy-cloze":
        return load_cloze(path)
    if name in ("sentiment-ab", "easy-ab"):
        return load_caa_json(path, name=name)
    if name in ("sentiment-words", "near-miss", "harmful-extra", "distill-prompts"):
        return _word_lists(path)
    if name in ("pirate-persona", "constitution"):
        return _text(path)
    return _string_list(path)
