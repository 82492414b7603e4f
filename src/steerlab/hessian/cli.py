"""`steerlab hessian spectrum|density|trace|separate`: each command builds its argument dataclass from
the options (generated from its fields) and calls its function in `steerlab.hessian.commands`, which
checks every input before a model loads. Under `torchrun` (e.g. `torchrun --nproc_per_node 2 -m
steerlab.cli hessian spectrum ...`) the curvature products of spectrum, density and trace are sharded
over the processes; rank 0 alone prints and writes."""

from __future__ import annotations

import argparse
import json

from steerlab.hessian.commands import (
    DensityArgs,
    SeparateArgs,
    SpectrumArgs,
    TraceArgs,
    density,
    separate,
    spectrum,
    trace,
)
from steerlab.options import add_arguments, from_namespace


def _run(cls, function):
    """A command function: options -> `cls` -> `function` -> one JSON line on stdout (`-q`: no progress)."""

    def command(ns: argparse.Namespace) -> None:
        from steerlab import distributed

        if ns.threads:
            import torch

            torch.set_num_threads(ns.threads)
        distributed.init()
        main = distributed.is_main()
        args = from_namespace(cls, ns, progress=main and not getattr(ns, "quiet", False))
        summary = function(args)
        if main:
            print(json.dumps(summary))

    return command


COMMANDS = (
    ("spectrum", "top-k eigenpairs by Lanczos (with residuals and product counts)", SpectrumArgs, spectrum),
    ("density", "spectral density by stochastic Lanczos quadrature", DensityArgs, density),
    ("trace", "Hutchinson / Hutch++ trace with a confidence interval", TraceArgs, trace),
    ("separate", "separable-submodule analysis (hybrid digits, or two text sets)", SeparateArgs, separate),
)


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `hessian` with sub-subcommands spectrum|density|trace|separate to an argparse subparsers object."""
    hessian = subparsers.add_parser(
        "hessian", help="Hessian spectra, densities, traces and submodule separation"
    )
    sub = hessian.add_subparsers(dest="hessian_command", required=True)
    for name, help_, cls, function in COMMANDS:
        p = sub.add_parser(name, help=help_)
        add_arguments(p, cls)
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
        p.set_defaults(func=_run(cls, function))
    return hessian
