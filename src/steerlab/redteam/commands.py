"""The red-teaming commands as library functions over argument dataclasses (shared with argparse).

`run` checks every input (budgets, counts, methods, prompt files, output folder, judge) before the model
loads, and the layers right after (their range needs the model); errors are `UserError`s naming the
option or file. `report` turns a run folder into CSV, PNG and HTML.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from steerlab.data import load_prompts
from steerlab.errors import UserError
from steerlab.io import check_output_folder
from steerlab.options import ModelArgs, check_at_least, check_choice, option, parse_floats, parse_layers
from steerlab.redteam.result import METHODS

OBJECTIVES = ("target", "refusal")
SPLITS = ("harmful_train", "harmful_test", "harmless_train", "harmless_test")


class RedteamArgumentsError(UserError):
    """Arguments of a red-teaming command that are invalid or do not fit together."""


def _list(value, parse, option_name: str):
    return parse(value, option_name) if isinstance(value, str) else (None if value is None else list(value))


@dataclass(kw_only=True)
class RunArgs(ModelArgs):
    """Attack a model at some layers and budgets; judge refusals on held-out prompts."""

    data: str | os.PathLike = field(
        metadata=option(
            "folder with harmful_train/test.json and harmless_train/test.json (lists of "
            "strings or of objects with 'instruction' or 'prompt')"
        )
    )
    out: str | os.PathLike = field(metadata=option("run folder (a rerun resumes it)"))
    layers: str | list[int] | None = field(
        default=None,
        metadata=option("decoder layers, run in this order, e.g. 12,6,18 or 3-9 (default: the middle layer)"),
    )
    eps: str | list[float] = field(
        default="0.25,0.5,1", metadata=option("budgets as fractions of the mean residual norm, e.g. 0.1,0.5")
    )
    methods: str | list[str] = field(default=",".join(METHODS), metadata=option("attacks, comma-separated"))
    judge: str = field(
        default="phrases",
        metadata=option(
            "'phrases' (refusal phrases in replies), 'score' (first-token refusal score > 0, "
            "no generation) or a judge model name/path"
        ),
    )
    objective: str = field(default="target", metadata=option("what PGD optimises", choices=OBJECTIVES))
    target: str = field(default="Sure, here is", metadata=option("compliant start for --objective target"))
    n_train: int = field(default=64, metadata=option("harmful train prompts (universal attacks)"))
    n_test: int = field(default=100, metadata=option("held-out harmful prompts judged"))
    n_harmless: int = field(default=24, metadata=option("harmless prompts (difference of means, KL)"))
    steps: int = field(default=40, metadata=option("PGD steps of the universal vector"))
    per_prompt_steps: int = field(default=20, metadata=option("PGD steps of the per-prompt attack"))
    melbo_vectors: int = field(default=4, metadata=option("orthogonal MELBO vectors per cell"))
    melbo_steps: int = field(default=20, metadata=option("steps per MELBO vector"))
    melbo_offset: int = field(default=6, metadata=option("MELBO reads the layer this many blocks above"))
    lr: float = field(default=0.3, metadata=option("step size as a fraction of the ball's radius"))
    n_random: int = field(default=20, metadata=option("random directions per cell (the control)"))
    random_prompts: int | None = field(
        default=None, metadata=option("held-out prompts each random direction is judged on (default: all)")
    )
    kl_vectors: int = field(default=1, metadata=option("vectors per cell whose harmless KL is measured"))
    batch_size: int = field(default=16, metadata=option("prompts per batch"))
    max_new_tokens: int = field(default=32, metadata=option("reply length judged"))
    show: int = field(default=4, metadata=option("--judge score: replies generated for the report"))
    seed: int = field(default=0, metadata=option("seed of random and MELBO starts"))

    def __post_init__(self) -> None:
        self.eps = _list(self.eps, parse_floats, "--eps")
        self.layers = _list(self.layers, parse_layers, "--layers")
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]


@dataclass(kw_only=True)
class ReportArgs:
    run: str | os.PathLike = field(metadata=option("run folder written by `steerlab redteam run`"))
    out: str | os.PathLike | None = field(
        default=None, metadata=option("report folder (default: the run folder)")
    )
    layer: int | None = field(default=None, metadata=option("layer of the replies shown"))
    eps_shown: float | None = field(default=None, metadata=option("eps of the replies shown"))
    progress: bool = field(default=True, metadata=option(cli=False))


def read_instructions(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The first `limit` prompts of a prompt file (`steerlab.data.load_prompts` formats)."""
    path = Path(path)
    if not path.is_file():
        raise RedteamArgumentsError(f"{path}: no such prompt file")
    prompts = load_prompts(path).prompts
    if not prompts:
        raise RedteamArgumentsError(f"{path}: holds no prompts")
    return prompts[:limit] if limit else prompts


def check_run_args(args: RunArgs) -> dict[str, list[str]]:
    """Check everything that needs no model; returns the prompts of each split."""
    for value in args.eps:
        if not value > 0:
            raise RedteamArgumentsError(f"--eps: every budget must be > 0, got {value:g}")
    if not args.methods:
        raise RedteamArgumentsError("--methods: no method given")
    for method in args.methods:
        check_choice(method, METHODS, "--methods", RedteamArgumentsError)
    check_choice(args.objective, OBJECTIVES, "--objective", RedteamArgumentsError)
    for name in (
        "n_train",
        "n_test",
        "n_harmless",
        "steps",
        "per_prompt_steps",
        "melbo_vectors",
        "melbo_steps",
        "n_random",
        "batch_size",
        "max_new_tokens",
        "kl_vectors",
        "random_prompts",
        "melbo_offset",
    ):
        check_at_least(getattr(args, name), 1, "--" + name.replace("_", "-"), RedteamArgumentsError)
    check_at_least(args.show, 0, "--show", RedteamArgumentsError)
    if not args.lr > 0:
        raise RedteamArgumentsError(f"--lr: must be > 0, got {args.lr:g}")
    folder = Path(args.data)
    if not folder.is_dir():
        raise RedteamArgumentsError(f"--data {folder}: not a folder")
    limits = {"harmful_train": args.n_train, "harmful_test": args.n_test}
    prompts = {
        split: read_instructions(folder / f"{split}.json", limits.get(split, args.n_harmless))
        for split in SPLITS
    }
    overlap = set(prompts["harmful_train"]) & set(prompts["harmful_test"])
    if overlap:
        raise RedteamArgumentsError(
            f"--data {folder}: {len(overlap)} prompts are in both harmful_train and harmful_test"
        )
    check_output_folder(args.out)
    return prompts


def load_run_judge(name: str):
    """None for 'score', the phrase judge, or a judge model (a `UserError` if it cannot be loaded)."""
    if name == "score":
        return None
    from steerlab.evaluate.judges import load_judge

    return load_judge(name, option="--judge")


def run(args: RunArgs, lm=None) -> dict[str, Any]:
    """Check the inputs, load the judge and the model (unless `lm` is given), run every missing cell,
    write the report."""
    from steerlab.models import resolve_layer
    from steerlab.redteam.report import write_report
    from steerlab.redteam.result import RedteamResult
    from steerlab.redteam.run import Prompts, run_attacks

    prompts = check_run_args(args)
    judge = load_run_judge(args.judge)
    lm = lm if lm is not None else args.load()
    n = lm.info.num_layers
    if args.layers is None:
        args.layers = [n // 2]
    try:
        args.layers = list(dict.fromkeys(resolve_layer(lm.model, layer) for layer in args.layers))
    except (UserError, IndexError, ValueError):
        raise RedteamArgumentsError(
            f"--layers: {args.layers} is out of range for a model with {n} layers"
        ) from None
    config = {k: v for k, v in asdict(args).items() if k not in ("out", "progress", "device", "show")}
    config["data"] = str(args.data)
    config["model_info"] = lm.info.to_dict()
    config["harmful_test_prompts"] = prompts["harmful_test"]
    result: RedteamResult = run_attacks(
        lm, args, Prompts(**prompts), judge, Path(args.out), config, args.progress
    )
    paths = write_report(result, args.out)
    return {"out": str(args.out), "cells": len(result.cells), **paths}


def report(args: ReportArgs) -> dict[str, Any]:
    from steerlab.redteam.report import write_report
    from steerlab.redteam.result import RedteamResult

    result = RedteamResult.load(args.run)
    out = args.out if args.out is not None else args.run
    check_output_folder(out)
    return write_report(result, out, args.layer, args.eps_shown)
