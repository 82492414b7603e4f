"""Model organisms: a base model fine-tuned by a `Recipe` (peft LoRA, merged), built on first use, cached.

Importing this package registers every known organism name with `steerlab.load_model`, so
`load_model("smollm2-135m-refusal")` builds the refusal organism once (a few minutes on a CPU) and loads
it from the cache after that. `register_organism(recipe)` does the same for a researcher's own recipe.
"""

from __future__ import annotations

from pathlib import Path

from steerlab.data.sources import data_root
from steerlab.models.loading import register_model_source
from steerlab.organisms.recipe import REFUSALS, Recipe, RecipeError, default_recipe

ORGANISMS: dict[str, Recipe] = {}
"""Registered organisms by name."""


def register_organism(recipe: Recipe) -> None:
    """Make `steerlab.load_model(recipe.name)` (and `--model NAME`) build-or-load this organism."""

    def resolve() -> Path:
        from steerlab.organisms.build import build_organism

        return build_organism(recipe)

    ORGANISMS[recipe.name] = recipe
    register_model_source(recipe.name, resolve)


register_organism(default_recipe())

__all__ = [
    "ORGANISMS",
    "REFUSALS",
    "Recipe",
    "RecipeError",
    "data_root",
    "default_recipe",
    "register_organism",
]
