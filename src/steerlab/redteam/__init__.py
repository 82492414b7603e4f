"""Red-teaming by norm-bounded activation perturbation: attacks at one layer (optimised universal and
per-prompt vectors, MELBO, difference of means, random controls), a resumable run over layers x budgets,
ASR metrics with bootstrap intervals, report and CLI."""

from steerlab.redteam.attacks import (
    Batch,
    Objective,
    diff_of_means,
    make_batches,
    melbo_attack,
    per_prompt_attack,
    project,
    random_directions,
    refusal_objective,
    universal_attack,
)
from steerlab.redteam.result import Cell, RedteamResult

__all__ = [
    "Batch",
    "Cell",
    "Objective",
    "RedteamResult",
    "diff_of_means",
    "make_batches",
    "melbo_attack",
    "per_prompt_attack",
    "project",
    "random_directions",
    "refusal_objective",
    "universal_attack",
]
