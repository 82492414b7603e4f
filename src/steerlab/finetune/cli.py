"""`steerlab compare`: options generated from `CompareArgs`; prints the summary as one JSON line."""

from __future__ import annotations

import argparse
import json

from steerlab.finetune.commands import CompareArgs, run_compare
from steerlab.options import add_arguments, from_namespace


def _compare(ns: argparse.Namespace) -> None:
    args = from_namespace(CompareArgs, ns, progress=not getattr(ns, "quiet", False))
    result = run_compare(args)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `compare` to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "compare", help="steering vector vs a trained bias vector vs LoRA at the same layer"
    )
    add_arguments(parser, CompareArgs)
    parser.set_defaults(func=_compare)
    from steerlab.finetune.commands import DistillArgs

    distill_parser = subparsers.add_parser(
        "distill", help="distil a system prompt into an activation injection (vectors, low rank, LoRA)"
    )
    add_arguments(distill_parser, DistillArgs)
    distill_parser.set_defaults(func=_distill)
    return parser


def _distill(ns: argparse.Namespace) -> None:
    from steerlab.finetune.commands import DistillArgs, run_distill

    args = from_namespace(DistillArgs, ns, progress=not getattr(ns, "quiet", False))
    result = run_distill(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "system_prompt_text")}))
