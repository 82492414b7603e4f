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
    from steerlab.finetune.commands import PairSearchArgs

    search = subparsers.add_parser(
        "pair-search", help="search contrast pairs for a stronger steering vector; length vs strength"
    )
    add_arguments(search, PairSearchArgs)
    search.set_defaults(func=_pair_search)
    return parser


def _pair_search(ns: argparse.Namespace) -> None:
    from steerlab.finetune.commands import PairSearchArgs, run_pair_search

    args = from_namespace(PairSearchArgs, ns, progress=not getattr(ns, "quiet", False))
    result = run_pair_search(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("candidates", "lengths")}))
