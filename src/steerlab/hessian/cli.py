"""`steerlab hessian spectrum|density|trace|separate`: each command builds its argument dataclass from
the options and calls its function in `steerlab.hessian.commands`, which checks every input before a
model loads."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields

from steerlab.hessian.commands import (
    KINDS,
    PARTS,
    TASKS,
    WHICH,
    DensityArgs,
    SeparateArgs,
    SpectrumArgs,
    TraceArgs,
    density,
    separate,
    spectrum,
    trace,
)
from steerlab.hessian.trace import METHODS
from steerlab.options import add_model_arguments


def _default(cls, name: str):
    """The dataclass's default for field `name` (argparse defaults come from the dataclasses)."""
    for f in fields(cls):
        if f.name == name:
            return f.default_factory() if f.default_factory is not MISSING else f.default
    raise KeyError(name)


def _run(cls, function):
    """A command function: options -> `cls` -> `function` -> one JSON line on stdout (`-q`: no progress)."""

    def command(ns: argparse.Namespace) -> None:
        if ns.threads:
            import torch

            torch.set_num_threads(ns.threads)
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        args = cls(**values, progress=not getattr(ns, "quiet", False))
        print(json.dumps(function(args)))

    return command


def _shared_args(p: argparse.ArgumentParser, cls) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--n-texts", type=int, default=_default(cls, "n_texts"), help="paragraphs read per text file"
    )
    p.add_argument("--max-length", type=int, default=_default(cls, "max_length"), help="tokens per paragraph")
    p.add_argument("--part", default=_default(cls, "part"), choices=PARTS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="output folder")


def _curvature_args(p: argparse.ArgumentParser, cls) -> None:
    _shared_args(p, cls)
    p.add_argument("--text", required=True, help="text file (UTF-8, paragraphs separated by blank lines)")
    p.add_argument("--batch-size", type=int, default=_default(cls, "batch_size"))
    p.add_argument("--include", action="append", default=None, help="regex on parameter names (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="regex on parameter names (repeatable)")
    p.add_argument("--layers", default=None, help="decoder layers, e.g. 10,11 or 24-29 or -1 (default: all)")
    p.add_argument("--kind", default=_default(cls, "kind"), choices=KINDS)
    p.add_argument("--seed", type=int, default=_default(cls, "seed"))


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `hessian` with sub-subcommands spectrum|density|trace|separate to an argparse subparsers object."""
    hessian = subparsers.add_parser(
        "hessian", help="Hessian spectra, densities, traces and submodule separation"
    )
    sub = hessian.add_subparsers(dest="hessian_command", required=True)

    p = sub.add_parser("spectrum", help="top-k eigenpairs by Lanczos (with residuals and product counts)")
    _curvature_args(p, SpectrumArgs)
    p.add_argument("--k", type=int, default=_default(SpectrumArgs, "k"))
    p.add_argument("--which", default=_default(SpectrumArgs, "which"), choices=WHICH)
    p.add_argument("--tol", type=float, default=_default(SpectrumArgs, "tol"))
    p.add_argument("--max-iter", type=int, default=_default(SpectrumArgs, "max_iter"))
    p.set_defaults(func=_run(SpectrumArgs, spectrum))

    p = sub.add_parser("density", help="spectral density by stochastic Lanczos quadrature")
    _curvature_args(p, DensityArgs)
    p.add_argument("--probes", type=int, default=_default(DensityArgs, "probes"))
    p.add_argument("--steps", type=int, default=_default(DensityArgs, "steps"))
    p.set_defaults(func=_run(DensityArgs, density))

    p = sub.add_parser("trace", help="Hutchinson / Hutch++ trace with a confidence interval")
    _curvature_args(p, TraceArgs)
    p.add_argument("--method", default=_default(TraceArgs, "method"), choices=list(METHODS))
    p.add_argument("--products", type=int, default=_default(TraceArgs, "products"))
    p.add_argument("--confidence", type=float, default=_default(TraceArgs, "confidence"))
    p.set_defaults(func=_run(TraceArgs, trace))

    p = sub.add_parser("separate", help="separable-submodule analysis (hybrid digits, or two text sets)")
    _shared_args(p, SeparateArgs)
    p.add_argument("--task", default=_default(SeparateArgs, "task"), choices=TASKS)
    p.add_argument(
        "--seeds", type=int, nargs="+", default=_default(SeparateArgs, "seeds"), help="hybrid-digits seeds"
    )
    p.add_argument(
        "--t",
        type=float,
        default=_default(SeparateArgs, "t"),
        help="hybrid-digits: perturbation size for unit directions (fixed in advance)",
    )
    p.add_argument("--text-a", default=None, help="--task text: first text file")
    p.add_argument("--text-b", default=None, help="--task text: second text file")
    p.add_argument("--layers", default=_default(SeparateArgs, "layers"), help="--task text: decoder layers")
    p.add_argument(
        "--k", type=int, default=_default(SeparateArgs, "k"), help="--task text: eigenpairs per set"
    )
    p.set_defaults(func=_run(SeparateArgs, separate))
    return hessian
