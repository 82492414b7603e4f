"""The hessian commands as library functions. One dataclass of arguments per command, shared by the
Python API and argparse (whose defaults come from these dataclasses).

Every function checks its inputs (option values, text files, layer list, output folder) before it loads
a model, so a wrong path costs nothing; errors are `UserError`s naming the option or the file. Results
are written atomically; each function returns the summary the command prints as one JSON line.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from steerlab.errors import UserError
from steerlab.hessian.lm import layer_params, read_texts, text_curvature, two_set_spectra
from steerlab.hessian.operator import CurvatureOperator
from steerlab.hessian.outputs import (
    write_density,
    write_separation,
    write_spectrum,
    write_trace,
)
from steerlab.io import check_output_folder
from steerlab.options import ModelArgs, parse_dtype, parse_layers

PARTS = ("mlp", "attention", "block")
KINDS = ("hessian", "ggn")
WHICH = ("LA", "SA", "LM", "BE")
TASKS = ("hybrid-digits", "text")


class HessianArgumentsError(UserError):
    """Arguments of a hessian command that are invalid or do not fit together."""


def _check_choice(value: str, choices: Sequence[str], option: str) -> None:
    if value not in choices:
        raise HessianArgumentsError(f"{option}: {value!r} is not one of {', '.join(choices)}")


def _layers(layers: str | list[int] | None) -> list[int] | None:
    return parse_layers(layers, "--layers") if isinstance(layers, str) or layers is None else list(layers)


@dataclass(kw_only=True)
class CurvatureArgs(ModelArgs):
    """The curvature of the next-token loss on a text file, over a choice of parameters."""

    text: str | os.PathLike
    out: str | os.PathLike
    n_texts: int = 8
    max_length: int = 48
    batch_size: int = 4
    include: list[str] | None = None
    exclude: list[str] | None = None
    layers: str | list[int] | None = None
    part: str = "mlp"
    kind: str = "hessian"
    seed: int = 0


@dataclass(kw_only=True)
class SpectrumArgs(CurvatureArgs):
    k: int = 10
    which: str = "LA"
    tol: float = 1e-6
    max_iter: int = 200


@dataclass(kw_only=True)
class DensityArgs(CurvatureArgs):
    probes: int = 4
    steps: int = 60


@dataclass(kw_only=True)
class TraceArgs(CurvatureArgs):
    method: str = "hutchpp"
    products: int = 60
    confidence: float = 0.95


@dataclass(kw_only=True)
class SeparateArgs(ModelArgs):
    """`hybrid-digits`: the separable-skills experiment over `seeds`; `text`: two text files compared."""

    out: str | os.PathLike
    task: str = "hybrid-digits"
    seeds: list[int] = field(default_factory=lambda: [10, 11, 12, 13, 14])
    t: float = 4.0
    text_a: str | os.PathLike | None = None
    text_b: str | os.PathLike | None = None
    n_texts: int = 8
    max_length: int = 48
    layers: str | list[int] | None = "-2,-1"
    part: str = "mlp"
    k: int = 5


def _load(args: ModelArgs):
    return args.load(attn_implementation="eager")


def curvature(args: CurvatureArgs) -> tuple[CurvatureOperator, dict]:
    """(operator, metadata to save with its results). Checks the options, the text file and the output
    folder, then loads the model."""
    _check_choice(args.part, PARTS, "--part")
    _check_choice(args.kind, KINDS, "--kind")
    parse_dtype(args.dtype)
    texts = read_texts(args.text, args.n_texts)
    layers = _layers(args.layers)
    check_output_folder(args.out)
    op, meta = text_curvature(
        _load(args),
        texts,
        layers,
        args.part,
        args.include,
        args.exclude,
        args.kind,
        args.batch_size,
        args.max_length,
        source=str(args.text),
    )
    if args.progress:
        print(
            f"operator: {args.kind} over {op.dim:,} parameters in {len(op.params)} tensors, "
            f"{len(texts)} texts",
            file=sys.stderr,
        )
    return op, meta


def spectrum(args: SpectrumArgs) -> dict:
    """Top-k eigenpairs by Lanczos: `spectrum.safetensors` + `.json` and `spectrum.png` in `args.out`."""
    from steerlab.hessian.lanczos import lanczos

    _check_choice(args.which, WHICH, "--which")
    op, meta = curvature(args)
    res = lanczos(
        op.matvec,
        op.dim,
        k=args.k,
        which=args.which,
        tol=args.tol,
        max_iter=args.max_iter,
        seed=args.seed,
        progress=args.progress,
    )
    res.meta.update(meta)
    return write_spectrum(res, args.out, f"top-{args.k} {args.which} {args.kind}")


def density(args: DensityArgs) -> dict:
    """Spectral density by stochastic Lanczos quadrature: `density.*` and `density.png` in `args.out`."""
    from steerlab.hessian.density import slq_density

    op, meta = curvature(args)
    dens = slq_density(
        op.matvec, op.dim, n_probes=args.probes, steps=args.steps, seed=args.seed, progress=args.progress
    )
    dens.meta.update(meta)
    return write_density(dens, args.out)


def trace(args: TraceArgs) -> dict:
    """Hutchinson / Hutch++ trace with a confidence interval: `trace.json`, `trace_meta.json`."""
    from steerlab.hessian.trace import METHODS

    _check_choice(args.method, tuple(METHODS), "--method")
    op, meta = curvature(args)
    est = METHODS[args.method](
        op.matvec, op.dim, args.products, confidence=args.confidence, seed=args.seed, progress=args.progress
    )
    return write_trace(est, args.out, meta)


def separate(args: SeparateArgs) -> dict:
    """The hybrid-digits experiment (JSON, figures, report.html) or the two-text-set comparison
    (eigenpairs of each set, `separation.json`) in `args.out`."""
    _check_choice(args.task, TASKS, "--task")
    if args.task == "hybrid-digits":
        from steerlab.hessian.hybrid import HybridConfig, run_experiment
        from steerlab.hessian.report import hybrid_report

        check_output_folder(args.out)
        t0 = time.perf_counter()
        result = run_experiment(list(args.seeds), HybridConfig(t=args.t), progress=args.progress)
        hybrid_report(result, args.out)
        return {**result["summary"], "seconds": time.perf_counter() - t0}
    if not (args.text_a and args.text_b):
        raise HessianArgumentsError("--task text needs --text-a and --text-b (one text file each)")
    _check_choice(args.part, PARTS, "--part")
    parse_dtype(args.dtype)
    texts_a, texts_b = read_texts(args.text_a, args.n_texts), read_texts(args.text_b, args.n_texts)
    layers = _layers(args.layers)
    check_output_folder(args.out)
    loaded = _load(args)
    params = layer_params(loaded.model, layers, args.part)
    res = two_set_spectra(
        loaded.model,
        loaded.tokenizer,
        texts_a,
        texts_b,
        params,
        k=args.k,
        max_length=args.max_length,
        progress=args.progress,
    )
    meta = {"model": loaded.info.to_dict(), "layers": layers, "part": args.part}
    return write_separation(res, args.out, meta)
