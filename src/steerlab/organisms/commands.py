"""The organism commands as library functions over argument dataclasses: `build` and `evaluate`.

Both check the recipe and every data file before a model loads; errors are `UserError`s naming the
option or recipe field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from steerlab.errors import UserError
from steerlab.io import check_output_folder
from steerlab.options import check_at_least, option
from steerlab.organisms import ORGANISMS, Recipe, register_organism
from steerlab.organisms.metrics import OrganismMetrics
from steerlab.organisms.recipe import REFUSAL_DATA

NEUTRAL_TEXT = "builtin:neutral-text"


@dataclass(kw_only=True)
class BuildArgs:
    name: str = field(
        default="smollm2-135m-refusal", metadata=option("a registered organism (ignored with --recipe)")
    )
    recipe: str | None = field(
        default=None, metadata=option("a recipe JSON file of fields (fields left out keep their defaults)")
    )
    force: bool = field(default=False, metadata=option("rebuild even when the organism is cached"))
    progress: bool = field(default=True, metadata=option(cli=False))


@dataclass(kw_only=True)
class EvaluateArgs(BuildArgs):
    out: str | None = field(
        default=None, metadata=option("folder for metrics.json and report.html (default: none written)")
    )
    harmful_test: str = field(
        default=f"{REFUSAL_DATA}/harmful_test.json",
        metadata=option("held-out prompts that should get the behaviour"),
    )
    harmless_test: str = field(
        default=f"{REFUSAL_DATA}/harmless_test.json",
        metadata=option("held-out prompts that should be answered"),
    )
    near_miss_test: str = field(
        default="builtin:near-miss/test",
        metadata=option("held-out harmless prompts worded like harmful ones"),
    )
    n: int = field(default=100, metadata=option("prompts drawn (seeded) from each test file"))
    n_direction: int = field(default=100, metadata=option("train prompts per side for the refusal direction"))
    direction_layer: int | None = field(
        default=None, metadata=option("layer of the refusal direction (default: the middle layer)")
    )
    direction_multiplier: float = field(default=1.0, metadata=option("multiplier of the added direction"))
    no_direction: bool = field(default=False, metadata=option("skip the refusal-direction check"))
    max_new_tokens: int = field(default=32, metadata=option("tokens generated per reply"))
    seed: int = field(default=0, metadata=option("seed of the test-prompt draws"))

    def __post_init__(self) -> None:
        check_at_least(self.n, 1, "--n")
        check_at_least(self.n_direction, 1, "--n-direction")
        check_at_least(self.max_new_tokens, 1, "--max-new-tokens")


def recipe_of(args: BuildArgs) -> Recipe:
    """The recipe `args` name: a `--recipe` file (registered under its name) or a registered organism."""
    if args.recipe is not None:
        recipe = Recipe.load(args.recipe)
        register_organism(recipe)
        return recipe
    if args.name not in ORGANISMS:
        raise UserError(f"--name: no organism {args.name!r}; registered: {', '.join(ORGANISMS)}")
    return ORGANISMS[args.name]


def build(args: BuildArgs) -> dict:
    """Build (or find cached) the organism; returns its folder, hash and whether it was built now."""
    from steerlab.organisms.build import build_organism, is_built, read_manifest, training_prompts

    recipe = recipe_of(args)
    cached = is_built(recipe) and not args.force
    if not cached:
        training_prompts(recipe)  # data problems surface before any work
    started = time.perf_counter()
    folder = build_organism(recipe, progress=args.progress, force=args.force)
    manifest = read_manifest(folder)
    return {
        "name": recipe.name,
        "hash": recipe.hash(),
        "folder": str(folder),
        "built_now": not cached,
        "seconds": time.perf_counter() - started,
        "build_seconds": manifest["seconds"]["total"],
    }


def measure(args: EvaluateArgs) -> tuple[Recipe, OrganismMetrics]:
    """The organism's recipe and its metrics against its base model (with the refusal-direction check)."""
    from steerlab.data import load_builtin
    from steerlab.models import load_model
    from steerlab.organisms.build import load_organism, training_prompts
    from steerlab.organisms.data import read_all, sample
    from steerlab.organisms.metrics import evaluate_organism

    recipe = recipe_of(args)
    harmful = sample(read_all([args.harmful_test], "--harmful-test"), args.n, args.seed)
    harmless = sample(read_all([args.harmless_test], "--harmless-test"), args.n, args.seed)
    near_miss = read_all([args.near_miss_test], "--near-miss-test")
    data = training_prompts(recipe)
    direction_train = None
    if not args.no_direction:
        direction_train = (
            sample(data.target, args.n_direction, recipe.seed + 2),
            sample(data.keep or data.near_miss, args.n_direction, recipe.seed + 2),
        )
    lm = load_organism(recipe, progress=args.progress)
    base = load_model(recipe.base_model)
    metrics = evaluate_organism(
        lm,
        base,
        harmful=harmful,
        harmless=harmless,
        near_miss=near_miss,
        neutral=load_builtin("neutral-text"),
        direction_train=direction_train,
        direction_layer=args.direction_layer,
        direction_multiplier=args.direction_multiplier,
        max_new_tokens=args.max_new_tokens,
        recipe_hash=recipe.hash(),
        progress=args.progress,
    )
    return recipe, metrics


def write_outputs(metrics: OrganismMetrics, recipe: Recipe, out: str | Path) -> None:
    """`metrics.json` and `report.html` in the folder `out` (written atomically)."""
    from steerlab.io import atomic_write_text
    from steerlab.organisms.metrics import save_metrics
    from steerlab.organisms.report import report_html

    save_metrics(metrics, Path(out))
    atomic_write_text(Path(out) / "report.html", report_html(metrics, recipe))


def evaluate(args: EvaluateArgs) -> dict:
    """`measure`, returning the headline figures; writes `metrics.json` and `report.html` to `--out`."""
    if args.out is not None:
        check_output_folder(args.out)
    recipe, metrics = measure(args)
    summary = {"name": recipe.name, "hash": recipe.hash(), **metrics.summary()}
    if args.out is not None:
        write_outputs(metrics, recipe, args.out)
        summary["out"] = str(args.out)
    return summary
