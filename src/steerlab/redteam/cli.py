"""`steerlab redteam run|report`: options generated from the argument dataclasses of
`steerlab.redteam.commands`; each command prints one JSON line."""

from __future__ import annotations

import argparse
import json

from steerlab.options import add_arguments, from_namespace
from steerlab.redteam.commands import ReportArgs, RunArgs, report, run

__all__ = ["add_subcommands"]


def _run(cls, function):
    def command(ns: argparse.Namespace) -> None:
        if getattr(ns, "threads", None):
            import torch

            torch.set_num_threads(ns.threads)
        args = from_namespace(cls, ns, progress=not getattr(ns, "quiet", False))
        print(json.dumps(function(args)))

    return command


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `redteam` with `run` and `report` to an argparse subparsers object."""
    redteam = subparsers.add_parser("redteam", help="red-teaming by norm-bounded activation perturbation")
    sub = redteam.add_subparsers(dest="redteam_command", required=True)
    p = sub.add_parser("run", help="attack at layers x budgets x methods; resumable run folder")
    add_arguments(p, RunArgs)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=_run(RunArgs, run))
    p = sub.add_parser("report", help="CSV, ASR-vs-eps PNG and HTML from a run folder")
    add_arguments(p, ReportArgs)
    p.set_defaults(func=_run(ReportArgs, report))
    return redteam
