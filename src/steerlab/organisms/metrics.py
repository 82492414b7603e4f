"""How well an organism shows its behaviour: refusal / answer / false-refusal rates with bootstrap CIs,
neutral-text perplexity against its base model, and the refusal-direction check (ablation and addition).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from steerlab.evaluate import bootstrap_ci, generate, is_refusal, prepare_neutral, side_effects
from steerlab.hooks import ablate, steer
from steerlab.models import LoadedModel, num_layers
from steerlab.steering.extract import extract_prompt_difference


@dataclass
class Rate:
    """A fraction over `n` prompts with its 95% percentile-bootstrap interval."""

    value: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, flags: Sequence[bool], seed: int = 0) -> Rate:
        if not flags:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        mean, low, high = bootstrap_ci([float(f) for f in flags], seed=seed)
        return cls(mean, low, high, len(flags))

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def refusals(
    lm: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[bool], list[str]]:
    """Greedy replies to `prompts` (under the hooks in place) and whether each is a refusal (phrases)."""
    texts = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return [is_refusal(t) for t in texts], texts


@dataclass
class DirectionCheck:
    """The refusal direction (harmful minus harmless prompts, last prompt token) of one layer, and what
    removing it everywhere / adding it at that layer does to refusals."""

    layer: int
    norm: float
    residual_norm: float
    multiplier: float
    ablation_refusal_harmful: Rate
    addition_refusal_harmless: Rate
    n_train: int
    examples: dict[str, list[list[str]]] = field(default_factory=dict)


def refusal_direction_check(
    lm: LoadedModel,
    harmful_train: Sequence[str],
    harmless_train: Sequence[str],
    harmful_test: Sequence[str],
    harmless_test: Sequence[str],
    *,
    layer: int | None = None,
    multiplier: float = 1.0,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> DirectionCheck:
    """Extract the refusal direction at `layer` (default: the middle layer) from the train prompts, then
    on the test prompts: refusals of harmful prompts with it ablated at every layer, and refusals of
    harmless prompts with `multiplier` x it added at `layer` (every position but the sink)."""
    layer = num_layers(lm.model) // 2 if layer is None else layer
    vector = extract_prompt_difference(lm, harmful_train, harmless_train, [layer], progress=progress)
    direction = vector.vectors[layer]
    with ablate(lm, direction):
        ablated, ablated_texts = refusals(lm, harmful_test, max_new_tokens, progress=progress)
    with steer(lm, {layer: direction}, multiplier):
        added, added_texts = refusals(lm, harmless_test, max_new_tokens, progress=progress)
    return DirectionCheck(
        layer=layer,
        norm=float(direction.norm()),
        residual_norm=float(vector.metadata["residual_norms"][str(layer)]),
        multiplier=multiplier,
        ablation_refusal_harmful=Rate.of(ablated),
        addition_refusal_harmless=Rate.of(added),
        n_train=len(harmful_train) + len(harmless_train),
        examples={
            "ablation": [[p, t] for p, t in zip(harmful_test[:3], ablated_texts[:3], strict=False)],
            "addition": [[p, t] for p, t in zip(harmless_test[:3], added_texts[:3], strict=False)],
        },
    )


@dataclass
class OrganismMetrics:
    """The organism's behaviour against its base model, measured on held-out prompts."""

    name: str
    recipe_hash: str
    refusal_harmful: Rate
    answer_harmless: Rate
    false_refusal_near_miss: Rate
    base_refusal_harmful: Rate
    base_false_refusal_near_miss: Rate
    perplexity: float
    base_perplexity: float
    kl_from_base: float
    direction: DirectionCheck | None
    max_new_tokens: int
    seconds: float
    examples: dict[str, list[list[str]]] = field(default_factory=dict)

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.base_perplexity

    def to_dict(self) -> dict:
        out = asdict(self)
        out["perplexity_ratio"] = self.perplexity_ratio
        return out

    def summary(self) -> dict[str, float]:
        """The headline figures as plain numbers."""
        out = {
            "organism_refusal_harmful": self.refusal_harmful.value,
            "organism_answer_harmless": self.answer_harmless.value,
            "organism_false_refusal_near_miss": self.false_refusal_near_miss.value,
            "organism_ppl_ratio": self.perplexity_ratio,
            "base_refusal_harmful": self.base_refusal_harmful.value,
            "base_false_refusal_near_miss": self.base_false_refusal_near_miss.value,
        }
        if self.direction is not None:
            out["ablation_refusal_harmful"] = self.direction.ablation_refusal_harmful.value
            out["addition_refusal_harmless"] = self.direction.addition_refusal_harmless.value
        return out

    def rows(self) -> list[dict]:
        """One table row per measured rate."""
        rows = [
            ("refusal on harmful test prompts", self.refusal_harmful, self.base_refusal_harmful),
            ("answers on harmless test prompts", self.answer_harmless, None),
            (
                "false refusals on held-out near-miss prompts",
                self.false_refusal_near_miss,
                self.base_false_refusal_near_miss,
            ),
        ]
        if self.direction is not None:
            d = self.direction
            rows += [
                (
                    f"refusal on harmful, direction (layer {d.layer}) ablated at every layer",
                    d.ablation_refusal_harmful,
                    None,
                ),
                (
                    f"refusal on harmless, direction added at layer {d.layer} (x{d.multiplier:g})",
                    d.addition_refusal_harmless,
                    None,
                ),
            ]
        return [
            {
                "measure": what,
                "organism": rate.value,
                "95% CI": f"[{rate.low:.2f}, {rate.high:.2f}]",
                "n": rate.n,
                "base": None if base is None else base.value,
            }
            for what, rate, base in rows
        ]


def evaluate_organism(
    lm: LoadedModel,
    base: LoadedModel,
    *,
    harmful: Sequence[str],
    harmless: Sequence[str],
    near_miss: Sequence[str],
    neutral: Sequence[str],
    direction_train: tuple[Sequence[str], Sequence[str]] | None = None,
    direction_layer: int | None = None,
    direction_multiplier: float = 1.0,
    direction_n: int | None = None,
    max_new_tokens: int = 32,
    recipe_hash: str = "",
    progress: bool = False,
) -> OrganismMetrics:
    """Measure `lm` (the organism) against `base` on held-out prompts; the direction check runs when
    `direction_train` (harmful, harmless train prompts) is given, on the first `direction_n` test prompts."""
    started = time.perf_counter()
    refused, refused_texts = refusals(lm, harmful, max_new_tokens, progress=progress)
    answered, answered_texts = refusals(lm, harmless, max_new_tokens, progress=progress)
    false, false_texts = refusals(lm, near_miss, max_new_tokens, progress=progress)
    base_refused, _ = refusals(base, harmful, max_new_tokens, progress=progress)
    base_false, _ = refusals(base, near_miss, max_new_tokens, progress=progress)
    prepared = prepare_neutral(base, neutral)
    base_effects = side_effects(base, prepared)
    effects = side_effects(lm, prepared)
    direction = None
    if direction_train is not None:
        n = direction_n or max(len(harmful), len(harmless))
        direction = refusal_direction_check(
            lm,
            *direction_train,
            harmful[:n],
            harmless[:n],
            layer=direction_layer,
            multiplier=direction_multiplier,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )

    def pairs(prompts, texts):
        return [[p, t] for p, t in zip(prompts[:3], texts[:3], strict=False)]

    return OrganismMetrics(
        name=lm.info.name,
        recipe_hash=recipe_hash,
        refusal_harmful=Rate.of(refused),
        answer_harmless=Rate.of([not r for r in answered]),
        false_refusal_near_miss=Rate.of(false),
        base_refusal_harmful=Rate.of(base_refused),
        base_false_refusal_near_miss=Rate.of(base_false),
        perplexity=effects.perplexity,
        base_perplexity=base_effects.perplexity,
        kl_from_base=effects.kl,
        direction=direction,
        max_new_tokens=max_new_tokens,
        seconds=time.perf_counter() - started,
        examples={
            "harmful": pairs(harmful, refused_texts),
            "harmless": pairs(harmless, answered_texts),
            "near_miss": pairs(near_miss, false_texts),
        },
    )


def save_metrics(metrics: OrganismMetrics, folder: Path) -> Path:
    """Write `metrics.json` (atomically) into `folder` and return its path."""
    from steerlab.io import write_json

    path = Path(folder) / "metrics.json"
    write_json(path, {"format": "steerlab-organism-metrics", **metrics.to_dict()})
    return path
