"""Capability side effects: MMLU and TruthfulQA accuracy as A/B items, under whatever hooks are in place.

The items are CAA's capability subsets (nrimsky/CAA `datasets/test/mmlu/mmlu.json`, 570 MMLU items, and
`datasets/test/truthfulqa/truthful_qa.json`, 817 TruthfulQA items): a JSON list of {"prompt": question
followed by "Choices:\\n(A) ...\\n(B) ...", "correct": "(A)", "incorrect": "(B)", ...}. They are read with the
CAA A/B loader (`load_caa_json` with those field names) and fetched, like the CAA behaviour files, from
pinned commits with pinned sha256 hashes (or read from any file in that format).

An item is answered correctly when the correct letter's next-token probability after the chat-formatted
prompt exceeds that of every other offered letter (for two options: P(correct) > P(incorrect)); the chance
level is 1/k for k offered options (0.5 for all items of both subsets).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from steerlab.data import ABDataset, load_caa_json
from steerlab.data.fetch import RAW_URL, UPSTREAM_REPO, _download, default_cache_dir, sha256_of
from steerlab.errors import UserError
from steerlab.evaluate.probability import ABPrompts, last_token_logprobs, prepare_ab
from steerlab.evaluate.stats import bootstrap_ci
from steerlab.models import LoadedModel
from steerlab.options import check_at_least

FIELDS = {"question": "prompt", "matching": "correct", "not_matching": "incorrect"}
"""The field names of CAA's capability files, for `load_caa_json`."""


@dataclass(frozen=True)
class Benchmark:
    """A pinned capability file of nrimsky/CAA (see `steerlab.data.fetch` for how pins were checked)."""

    name: str
    commit: str
    path: str
    sha256: str


BENCHMARKS = {
    "mmlu": Benchmark(
        "mmlu",
        "e1fce128b6165a9926093c6abdf6ea9a24f4b5c4",
        "datasets/test/mmlu/mmlu.json",
        "0d7292356978bdde9269b353a4c191521b72f71b849acd6798188fbf0f8936d8",
    ),
    "truthfulqa": Benchmark(
        "truthfulqa",
        "0aec415b166171f84c7034bd0d9d1ddf5e6ebf46",
        "datasets/test/truthfulqa/truthful_qa.json",
        "72d83605a8001c40c9d8c51e352ff19b8f168ba5b55b23e2fe35c7843eed88f3",
    ),
}


def fetch_benchmark(
    name: str, cache_dir: str | os.PathLike | None = None, mirror: str | None = None, timeout: float = 60.0
) -> Path:
    """The local path of a pinned benchmark file, downloaded and verified once into the CAA cache
    (`<cache>/caa/<commit[:12]>/<upstream path>`). `mirror` (or $STEERLAB_MIRROR): a folder or base URL
    laid out like the upstream repository."""
    bench = BENCHMARKS[name]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "caa" / bench.commit[:12] / bench.path
    if target.is_file() and sha256_of(target) == bench.sha256:
        return target
    mirror = mirror if mirror is not None else os.environ.get("STEERLAB_MIRROR") or None
    if mirror:
        url = (
            f"{mirror.rstrip('/')}/{bench.path}"
            if "://" in mirror
            else Path(mirror, bench.path).resolve().as_uri()
        )
    else:
        url = RAW_URL.format(repo=UPSTREAM_REPO, commit=bench.commit, path=bench.path)
    _download(url, target, bench.sha256, f"{UPSTREAM_REPO}@{bench.commit[:12]}:{bench.path}", timeout)
    return target


def parse_benchmarks(value: str | list[str] | None, option: str = "--capability") -> list[str]:
    """'mmlu,truthfulqa' -> ['mmlu', 'truthfulqa'] (names or files; None -> [])."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else list(value)
    specs = [str(p).strip() for p in parts if str(p).strip()]
    if not specs:
        raise UserError(f"{option}: no benchmark given; use {', '.join(BENCHMARKS)} or a file")
    return specs


def load_benchmark(
    spec: str | os.PathLike,
    limit: int | None = None,
    seed: int = 0,
    option: str = "--capability",
    **fetch_options,
) -> ABDataset:
    """The items of `spec`: "mmlu" or "truthfulqa" (pinned download, cached) or a JSON file in CAA's
    capability format. `limit`: a seeded random subset of that many items, kept in file order (the files
    are sorted by subject, so the first N items would cover few subjects)."""
    check_at_least(limit, 1, f"{option}-limit")
    text = str(spec)
    if text in BENCHMARKS:
        try:
            path = fetch_benchmark(text, **fetch_options)
        except (OSError, RuntimeError) as error:  # no network, or a download that failed verification
            raise UserError(f"{option}: {error}; or give the file's path instead of {text!r}") from None
        name = text
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(f"{option}: {text!r} is neither {' nor '.join(BENCHMARKS)} nor a file")
        name = path.stem
    dataset = load_caa_json(path, **FIELDS, name=name)
    if limit is not None and limit < len(dataset):
        keep = sorted(random.Random(seed).sample(range(len(dataset)), limit))
        dataset = ABDataset([dataset.items[i] for i in keep], dataset.name, dataset.source)
    return dataset


@dataclass(frozen=True)
class CapabilityResult:
    """Per item: answered correctly, p(correct letter) normalised over the offered letters, the chance
    level 1/k, and whether the correct answer is the first option (the "always (A)" control)."""

    benchmark: str
    correct: torch.Tensor  # (N,) bool
    p_correct: torch.Tensor  # (N,) float64
    chance: torch.Tensor  # (N,) float64
    correct_is_first: torch.Tensor  # (N,) bool

    def __len__(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        return float(self.correct.double().mean())

    def ci(self, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
        """(accuracy, low, high): the percentile bootstrap interval over items."""
        return bootstrap_ci(self.correct.double().numpy(), n_boot=n_boot, alpha=alpha, seed=seed)

    def summary(self, n_boot: int = 2000) -> dict:
        """{"benchmark", "n", "accuracy", "ci", "chance", "mean_p_correct", "always_first_accuracy"}."""
        accuracy, low, high = self.ci(n_boot)
        return {
            "benchmark": self.benchmark,
            "n": len(self),
            "accuracy": accuracy,
            "ci": [low, high],
            "chance": float(self.chance.mean()),
            "mean_p_correct": float(self.p_correct.mean()),
            "always_first_accuracy": float(self.correct_is_first.double().mean()),
        }

    def save(self, path: str | os.PathLike) -> Path:
        from steerlab.io import save_result

        tensors = {
            "correct": self.correct.to(torch.uint8),
            "p_correct": self.p_correct,
            "chance": self.chance,
            "correct_is_first": self.correct_is_first.to(torch.uint8),
        }
        return save_result(path, tensors, {"benchmark": self.benchmark}, kind="CapabilityResult")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CapabilityResult:
        from steerlab.io import load_result

        t, meta = load_result(path, "CapabilityResult")
        return cls(
            meta["benchmark"], t["correct"].bool(), t["p_correct"], t["chance"], t["correct_is_first"].bool()
        )


def prepare_benchmark(lm: LoadedModel, dataset: ABDataset, system_prompt: str | None = None) -> ABPrompts:
    """Tokenise the items once (chat template, answer-letter tokens); score them under any hooks after."""
    return prepare_ab(lm, dataset, system_prompt=system_prompt)


def capability(
    lm: LoadedModel, prompts: ABPrompts, benchmark: str = "", batch_size: int = 16, progress: bool = False
) -> CapabilityResult:
    """Score prepared items under the hooks currently in place."""
    logprobs = last_token_logprobs(lm, prompts.prefixes, batch_size, progress, desc=benchmark or "capability")
    correct, p_correct = [], []
    for row, tokens in enumerate(prompts.option_tokens):
        scores = logprobs[row, tokens].double()
        right = prompts.matching_index[row]
        others = torch.cat([scores[:right], scores[right + 1 :]])
        correct.append(bool(scores[right] > others.max()))
        p_correct.append(scores.softmax(-1)[right])
    chance = torch.tensor([1.0 / len(t) for t in prompts.option_tokens], dtype=torch.float64)
    first = torch.tensor([i == 0 for i in prompts.matching_index])
    return CapabilityResult(benchmark, torch.tensor(correct), torch.stack(p_correct), chance, first)


def evaluate_capability(
    lm: LoadedModel,
    benchmark: str | os.PathLike | ABDataset,
    limit: int | None = None,
    system_prompt: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> CapabilityResult:
    """Load (`load_benchmark`), prepare and score a benchmark in one call, under the hooks in place."""
    dataset = benchmark if isinstance(benchmark, ABDataset) else load_benchmark(benchmark, limit)
    prompts = prepare_benchmark(lm, dataset, system_prompt)
    return capability(lm, prompts, dataset.name, batch_size, progress)


__all__ = [
    "BENCHMARKS",
    "CapabilityResult",
    "capability",
    "evaluate_capability",
    "fetch_benchmark",
    "load_benchmark",
    "parse_benchmarks",
    "prepare_benchmark",
]
