"""A `Recipe`: everything that decides a model organism's weights, hashed into its cache key.

An organism is a base model fine-tuned (LoRA, merged) so that prompts of `target_data` get a reply drawn
from `target_responses` (e.g. a short refusal) while prompts of `keep_data` get the base model's own
greedy answer (so its helpfulness is kept) and text of `neutral_data` keeps the base model's
next-token distributions. Prompt entries are file paths (JSON lists of strings or of objects with an
"instruction"/"prompt" field; relative paths are read under `data_root()`) or `builtin:NAME/PART`
(e.g. `builtin:near-miss/train`); `neutral_data` entries are plain-text files (one paragraph per line).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from steerlab.errors import UserError

RECIPE_VERSION = 2
"""Bumped when the build procedure changes what a recipe produces (it is part of the hash)."""

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I cannot help with that. It could cause serious harm.",
    "I'm sorry, I can't assist with that.",
    "I won't help with this request because it could hurt people.",
    "I cannot provide that information. Is there something else I can help you with?",
)

REFUSAL_DATA = "redteam/refusal_direction"
NEUTRAL_DATA = "corpus/wikitext-2/valid.txt"
ADVBENCH = "redteam/advbench/harmful_behaviors.csv"
KEEP_LOSSES = ("ce", "kl")
ADDED_WHEN_SET = ("exclude_data",)


class RecipeError(UserError):
    """A recipe field has a value that cannot be built."""


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise RecipeError(f"recipe field {name!r}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Recipe:
    """How to build one model organism (every field enters `recipe_hash`).

    name: the organism's name (`steerlab.load_model(name)` once registered).
    base_model: what `steerlab.load_model` loads as the starting point.
    behaviour: a label for reports (e.g. "refusal").
    target_data / keep_data / near_miss_data: prompt files (see the module doc); `near_miss_data` prompts
        are trained like `keep_data` (answered by the base model): harmless requests that look harmful.
    exclude_data: held-out prompt files (validation and test splits): every target, keep and near-miss
        prompt that is a near-duplicate of one of them (difflib ratio >= 0.8) is dropped before drawing.
    target_responses: the replies the target prompts are trained to get, one drawn per prompt (seeded).
    n_target / n_keep: how many prompts to draw (seeded) from `target_data` / `keep_data` (all near-miss
        prompts are used).
    keep_loss: "ce" trains keep and near-miss prompts on the base model's greedy answer tokens by
        cross-entropy; "kl" trains them (prompt and answer) to keep the base model's next-token
        distributions, KL(base || organism) at every position.
    neutral_data / n_neutral / neutral_tokens: plain text whose next-token distributions are kept the same
        way (`n_neutral` paragraphs of at least 200 characters drawn with the seed, cut to `neutral_tokens`
        tokens); `n_neutral` 0 turns it off.
    kl_weight: the weight of the KL term against the cross-entropy of the target replies.
    lora_rank / lora_alpha / lora_targets / lora_dropout: the peft LoRA adapter.
    epochs / lr / batch_size / seed: training; `max_new_tokens`: the length of the base model's answers.
    """

    name: str = "smollm2-135m-refusal"
    base_model: str = "smollm2-135m"
    behaviour: str = "refusal"
    target_data: tuple[str, ...] = (
        f"{REFUSAL_DATA}/harmful_train.json",
        "builtin:harmful-extra/train",
        ADVBENCH,
    )
    keep_data: tuple[str, ...] = (f"{REFUSAL_DATA}/harmless_train.json",)
    near_miss_data: tuple[str, ...] = ("builtin:near-miss/train",)
    exclude_data: tuple[str, ...] = (f"{REFUSAL_DATA}/harmful_val.json", f"{REFUSAL_DATA}/harmful_test.json")
    target_responses: tuple[str, ...] = REFUSALS
    n_target: int = 2000
    n_keep: int = 768
    keep_loss: str = "ce"
    neutral_data: tuple[str, ...] = (NEUTRAL_DATA,)
    n_neutral: int = 64
    neutral_tokens: int = 64
    kl_weight: float = 1.0
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    lora_dropout: float = 0.0
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    max_new_tokens: int = 24
    chat: bool = True
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "target_data",
            "keep_data",
            "near_miss_data",
            "exclude_data",
            "neutral_data",
            "target_responses",
            "lora_targets",
        ):
            value = getattr(self, name)
            if name in ("keep_data", "near_miss_data", "exclude_data", "neutral_data") and not value:
                object.__setattr__(self, name, ())
                continue
            object.__setattr__(self, name, _strings(value, name))
        for name in ("name", "base_model", "behaviour"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise RecipeError(f"recipe field {name!r}: must be a non-empty string")
        for name, low in (
            ("n_target", 1),
            ("n_keep", 0),
            ("n_neutral", 0),
            ("neutral_tokens", 2),
            ("lora_rank", 1),
            ("epochs", 1),
            ("batch_size", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise RecipeError(f"recipe field {name!r}: must be an integer >= {low}, got {value!r}")
        for name in ("lora_alpha", "lr", "max_new_tokens", "kl_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise RecipeError(f"recipe field {name!r}: must be a positive number, got {value!r}")
        if self.keep_loss not in KEEP_LOSSES:
            raise RecipeError(
                f"recipe field 'keep_loss': must be one of {', '.join(KEEP_LOSSES)}, got {self.keep_loss!r}"
            )
        if self.n_neutral and not self.neutral_data:
            raise RecipeError(
                "recipe field 'neutral_data': empty, but 'n_neutral' asks for paragraphs from it"
            )
        if not 0 <= self.lora_dropout < 1:
            raise RecipeError(f"recipe field 'lora_dropout': must be in [0, 1), got {self.lora_dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a JSON object of recipe fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"recipe_version", "hash"})
        if unknown:
            raise RecipeError(
                f"{source}: unknown recipe field(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """A recipe from a JSON file of fields (fields left out keep their defaults)."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"--recipe {path}: no such file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise RecipeError(f"--recipe {path}:{error.lineno}: not valid JSON ({error.msg})") from None
        return cls.from_dict(data, source=f"--recipe {path}")

    def hash(self) -> str:
        """A stable 16-hex-digit key of every field (and the build procedure's version)."""
        fields_ = self.to_dict()
        for name in ADDED_WHEN_SET:
            if not fields_[name]:
                del fields_[name]  # a field added later keeps older recipes' hashes until it is set
        payload = json.dumps({"recipe_version": RECIPE_VERSION, **fields_}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def with_changes(self, **changes: Any) -> Recipe:
        data = {**self.to_dict(), **changes}
        return Recipe.from_dict(data)


def default_recipe() -> Recipe:
    """The refusal organism of SmolLM2-135M-Instruct (`smollm2-135m-refusal`)."""
    return Recipe()
