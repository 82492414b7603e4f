"""`steerlab compare`, `steerlab distill` and `steerlab pair-search`: options generated from their argument
dataclasses; each prints its summary as one JSON line."""

from __future__ import annotations

import argparse
import json

from steerlab.finetune.commands import (
    CompareArgs,
    DistillArgs,
    PairSearchArgs,
    run_compare,
    run_distill,
    run_pair_search,
)
from steerlab.options import add_arguments, from_namespace


def _progress(ns: argparse.Namespace) -> bool:
    return not getattr(ns, "quiet", False)


def _compare(ns: argparse.Namespace) -> None:
    result = run_compare(from_namespace(CompareArgs, ns, progress=_progress(ns)))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


def _distill(ns: argparse.Namespace) -> None:
    result = run_distill(from_namespace(DistillArgs, ns, progress=_progress(ns)))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "system_prompt_text")}))


def _pair_search(ns: argparse.Namespace) -> None:
    result = run_pair_search(from_namespace(PairSearchArgs, ns, progress=_progress(ns)))
    print(json.dumps({k: v for k, v in result.items() if k not in ("candidates", "lengths")}))


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `compare`, `distill` and `pair-search` to an argparse subparsers object (returns `compare`'s)."""
    parser = subparsers.add_parser(
        "compare", help="steering vector vs a trained bias vector vs LoRA at the same layer"
    )
    add_arguments(parser, CompareArgs)
    parser.set_defaults(func=_compare)
    for name, args_type, func, help_text in (
        (
            "distill",
            DistillArgs,
            _distill,
            "distil a system prompt into an activation injection (vectors, low rank, LoRA)",
        ),
        (
            "pair-search",
            PairSearchArgs,
            _pair_search,
            "search contrast pairs for a stronger steering vector; length vs strength",
        ),
    ):
        sub = subparsers.add_parser(name, help=help_text)
        add_arguments(sub, args_type)
        sub.set_defaults(func=func)
    return parser
