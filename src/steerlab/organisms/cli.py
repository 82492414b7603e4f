"""`steerlab organism build|evaluate`: options generated from the argument dataclasses of
`steerlab.organisms.commands`; each prints one JSON line."""

from __future__ import annotations

import argparse
import json

from steerlab.options import add_arguments, from_namespace
from steerlab.organisms.commands import BuildArgs, EvaluateArgs, build, evaluate

COMMANDS = (
    (
        "build",
        "build the organism once (LoRA fine-tune, merged, cached); later calls find it cached",
        BuildArgs,
        build,
    ),
    (
        "evaluate",
        "refusal / answer / false-refusal rates, perplexity and the refusal-direction check",
        EvaluateArgs,
        evaluate,
    ),
)


def _run(cls, function):
    def command(ns: argparse.Namespace) -> None:
        args = from_namespace(cls, ns, progress=not getattr(ns, "quiet", False))
        print(json.dumps(function(args)))

    return command


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `organism` with sub-subcommands build|evaluate to an argparse subparsers object."""
    organism = subparsers.add_parser(
        "organism", help="model organisms: build and evaluate (e.g. the refusal organism)"
    )
    sub = organism.add_subparsers(dest="organism_command", required=True)
    for name, help_, cls, function in COMMANDS:
        p = sub.add_parser(name, help=help_)
        add_arguments(p, cls)
        p.set_defaults(func=_run(cls, function))
    return organism
