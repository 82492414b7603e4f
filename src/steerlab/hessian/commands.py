"""The hessian commands as library functions. One dataclass of arguments per command, shared by the
Python API and argparse (whose defaults come from these dataclasses).

Every function checks its inputs (option values, text files, layer list, output folder) before it loads
a model, so a wrong path costs nothing; errors are `UserError`s naming the option or the file. Results
are written atomically; each function returns the summary the command prints as one JSON line.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from steerlab import distributed
from steerlab.data.errors import read_text
from steerlab.errors import UserError
from steerlab.hessian.lm import (
    PARTS,
    layer_params,
    read_texts,
    text_curvature,
    token_chunks,
    two_set_spectra,
)
from steerlab.hessian.operator import CurvatureOperator
from steerlab.hessian.outputs import (
    write_density,
    write_separation,
    write_spectrum,
    write_trace,
)
from steerlab.hessian.trace import METHODS
from steerlab.io import check_output_folder
from steerlab.options import ModelArgs, check_at_least, check_choice, option, parse_dtype, parse_layers

KINDS = ("hessian", "ggn")
WHICH = ("LA", "SA", "LM", "BE")
TASKS = ("hybrid-digits", "text")


class HessianArgumentsError(UserError):
    """Arguments of a hessian command that are invalid or do not fit together."""


def _layers(layers: str | list[int] | None) -> list[int] | None:
    return parse_layers(layers, "--layers") if isinstance(layers, str) or layers is None else list(layers)


@dataclass(kw_only=True)
class CurvatureArgs(ModelArgs):
    """The curvature of the next-token loss on a text file, over a choice of parameters."""

    text: str | os.PathLike = field(metadata=option("text file (UTF-8, paragraphs separated by blank lines)"))
    out: str | os.PathLike = field(metadata=option("output folder"))
    n_texts: int = field(default=8, metadata=option("paragraphs read per text file"))
    max_length: int = field(default=48, metadata=option("tokens per paragraph"))
    batch_size: int = field(default=4, metadata=option("paragraphs per batch"))
    stream: bool = field(
        default=False,
        metadata=option(
            "read --text as one token stream cut into --n-texts sequences of exactly --max-length tokens "
            "(e.g. a WikiText split) instead of paragraphs"
        ),
    )
    cache_graph: bool = field(
        default=False,
        metadata=option("keep each batch's first-order graph between products (faster, more memory)"),
    )
    include: list[str] | None = field(
        default=None, metadata=option("regex on parameter names (repeatable)", append=True)
    )
    exclude: list[str] | None = field(
        default=None, metadata=option("regex on parameter names (repeatable)", append=True)
    )
    layers: str | list[int] | None = field(
        default=None, metadata=option("decoder layers, e.g. 10,11 or 24-29 or -1 (default: all)")
    )
    part: str = field(default="mlp", metadata=option("part of each decoder layer", choices=PARTS))
    kind: str = field(default="hessian", metadata=option("curvature matrix", choices=KINDS))
    seed: int = field(default=0, metadata=option("seed of the random start and probes"))


@dataclass(kw_only=True)
class SpectrumArgs(CurvatureArgs):
    k: int = field(default=10, metadata=option("eigenpairs"))
    which: str = field(default="LA", metadata=option("which end of the spectrum", choices=WHICH))
    tol: float = field(default=1e-6, metadata=option("Lanczos convergence tolerance"))
    max_iter: int = field(default=200, metadata=option("most Lanczos iterations"))
    basis_dtype: str = field(
        default="float64", metadata=option("storage of the Krylov basis", choices=("float64", "float32"))
    )
    basis_dir: str | os.PathLike | None = field(
        default=None, metadata=option("keep the Krylov basis in a file in this folder instead of RAM")
    )
    checkpoint_every: int = field(
        default=0,
        metadata=option(
            "save the Lanczos state in OUT/checkpoint every N products and resume from it when rerun "
            "(the basis then lives in a file there; 0: no checkpoint)"
        ),
    )


@dataclass(kw_only=True)
class DensityArgs(CurvatureArgs):
    probes: int = field(default=4, metadata=option("random probe vectors"))
    steps: int = field(default=60, metadata=option("Lanczos steps per probe"))
    basis_dtype: str = field(
        default="float64",
        metadata=option("storage of each probe's Krylov basis", choices=("float64", "float32")),
    )
    checkpoint_every: int = field(
        default=0,
        metadata=option(
            "save each probe's Lanczos state in OUT/checkpoint every N products and resume from it when "
            "rerun (0: no checkpoint)"
        ),
    )


@dataclass(kw_only=True)
class TraceArgs(CurvatureArgs):
    method: str = field(default="hutchpp", metadata=option("estimator", choices=tuple(METHODS)))
    products: int = field(default=60, metadata=option("Hessian-vector products"))
    confidence: float = field(default=0.95, metadata=option("level of the confidence interval"))


@dataclass(kw_only=True)
class SeparateArgs(ModelArgs):
    """`hybrid-digits`: the separable-skills experiment over `seeds`; `text`: two text files compared."""

    out: str | os.PathLike = field(metadata=option("output folder"))
    task: str = field(default="hybrid-digits", metadata=option("experiment", choices=TASKS))
    seeds: list[int] = field(
        default_factory=lambda: [10, 11, 12, 13, 14],
        metadata=option("hybrid-digits seeds", parse=int, nargs="+"),
    )
    t: float = field(
        default=4.0,
        metadata=option("hybrid-digits: perturbation size for unit directions (fixed in advance)"),
    )
    text_a: str | os.PathLike | None = field(default=None, metadata=option("--task text: first text file"))
    text_b: str | os.PathLike | None = field(default=None, metadata=option("--task text: second text file"))
    n_texts: int = field(default=8, metadata=option("paragraphs read per text file"))
    max_length: int = field(default=48, metadata=option("tokens per paragraph"))
    layers: str | list[int] | None = field(default="-2,-1", metadata=option("--task text: decoder layers"))
    part: str = field(default="mlp", metadata=option("part of each decoder layer", choices=PARTS))
    k: int = field(default=5, metadata=option("--task text: eigenpairs per set"))


def _counts(args: ModelArgs, *names: str) -> None:
    """Each named field is a positive count (a `HessianArgumentsError` naming its option otherwise)."""
    for name in names:
        check_at_least(getattr(args, name), 1, "--" + name.replace("_", "-"), HessianArgumentsError)


def _load(args: ModelArgs):
    return args.load(attn_implementation="eager")


def curvature(args: CurvatureArgs) -> tuple[CurvatureOperator, dict]:
    """(operator, metadata to save with its results). Checks the options, the text file and the output
    folder, then loads the model."""
    check_choice(args.part, PARTS, "--part", HessianArgumentsError)
    check_choice(args.kind, KINDS, "--kind", HessianArgumentsError)
    _counts(args, "n_texts", "max_length", "batch_size")
    parse_dtype(args.dtype)
    if not args.stream:
        texts = read_texts(args.text, args.n_texts, option="--text")
    else:
        read_text(args.text, "--text")
    layers = _layers(args.layers)
    check_output_folder(args.out)
    loaded = _load(args)
    if args.stream:
        texts = token_chunks(loaded.tokenizer, args.text, args.n_texts, args.max_length, option="--text")
    op, meta = text_curvature(
        loaded,
        texts,
        layers,
        args.part,
        args.include,
        args.exclude,
        args.kind,
        args.batch_size,
        args.max_length,
        source=str(args.text),
        shard=True,
        cache_graph=args.cache_graph,
    )
    meta["stream"] = args.stream
    if args.stream:
        meta["tokens"] = args.n_texts * args.max_length
    if args.progress:
        print(
            f"operator: {args.kind} over {op.dim:,} parameters in {len(op.params)} tensors, "
            f"{len(texts)} {'sequences' if args.stream else 'texts'}, {distributed.world_size()} process(es)",
            file=sys.stderr,
        )
    return op, meta


def _checkpoint(args, name: str) -> Path | None:
    """OUT/checkpoint/NAME when `--checkpoint-every` is on (a rerun resumes from it), else None."""
    return Path(args.out) / "checkpoint" / name if args.checkpoint_every > 0 else None


def _done(folder: Path | None) -> None:
    """Remove a checkpoint once its result is written (rank 0, which owns it)."""
    if folder is not None and distributed.is_main():
        shutil.rmtree(folder, ignore_errors=True)
        if not any(folder.parent.iterdir()):
            folder.parent.rmdir()


def spectrum(args: SpectrumArgs) -> dict:
    """Top-k eigenpairs by Lanczos: `spectrum.safetensors` + `.json` and `spectrum.png` in `args.out`."""
    import torch

    from steerlab.hessian.lanczos import lanczos

    check_choice(args.which, WHICH, "--which", HessianArgumentsError)
    check_choice(args.basis_dtype, ("float64", "float32"), "--basis-dtype", HessianArgumentsError)
    if args.basis_dir is not None and os.path.exists(args.basis_dir) and not os.path.isdir(args.basis_dir):
        raise HessianArgumentsError(f"--basis-dir: not a folder: {args.basis_dir}")
    _counts(args, "k", "max_iter")
    check_at_least(args.checkpoint_every, 0, "--checkpoint-every", HessianArgumentsError)
    op, meta = curvature(args)
    checkpoint = _checkpoint(args, "spectrum")
    res = lanczos(
        op.matvec,
        op.dim,
        k=args.k,
        which=args.which,
        tol=args.tol,
        max_iter=args.max_iter,
        seed=args.seed,
        progress=args.progress,
        basis_dtype=getattr(torch, args.basis_dtype),
        basis_dir=args.basis_dir,
        checkpoint=checkpoint,
        checkpoint_every=max(args.checkpoint_every, 1),
    )
    res.meta.update(meta)
    if not distributed.is_main():
        return {}
    summary = write_spectrum(res, args.out, f"top-{args.k} {args.which} {args.kind}")
    _done(checkpoint)
    return summary


def density(args: DensityArgs) -> dict:
    """Spectral density by stochastic Lanczos quadrature: `density.*` and `density.png` in `args.out`."""
    import torch

    from steerlab.hessian.density import slq_density

    _counts(args, "probes", "steps")
    check_choice(args.basis_dtype, ("float64", "float32"), "--basis-dtype", HessianArgumentsError)
    check_at_least(args.checkpoint_every, 0, "--checkpoint-every", HessianArgumentsError)
    op, meta = curvature(args)
    checkpoint = _checkpoint(args, "density")
    dens = slq_density(
        op.matvec,
        op.dim,
        n_probes=args.probes,
        steps=args.steps,
        seed=args.seed,
        progress=args.progress,
        checkpoint=checkpoint,
        checkpoint_every=max(args.checkpoint_every, 1),
        basis_dtype=getattr(torch, args.basis_dtype),
    )
    dens.meta.update(meta)
    if not distributed.is_main():
        return {}
    summary = write_density(dens, args.out)
    _done(checkpoint)
    return summary


def trace(args: TraceArgs) -> dict:
    """Hutchinson / Hutch++ trace with a confidence interval: `trace.json`, `trace_meta.json`."""
    check_choice(args.method, tuple(METHODS), "--method", HessianArgumentsError)
    _counts(args, "products")
    op, meta = curvature(args)
    est = METHODS[args.method](
        op.matvec, op.dim, args.products, confidence=args.confidence, seed=args.seed, progress=args.progress
    )
    return write_trace(est, args.out, meta) if distributed.is_main() else {}


def separate(args: SeparateArgs) -> dict:
    """The hybrid-digits experiment (JSON, figures, report.html) or the two-text-set comparison
    (eigenpairs of each set, `separation.json`) in `args.out`."""
    check_choice(args.task, TASKS, "--task", HessianArgumentsError)
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
    check_choice(args.part, PARTS, "--part", HessianArgumentsError)
    _counts(args, "n_texts", "max_length", "k")
    parse_dtype(args.dtype)
    texts_a = read_texts(args.text_a, args.n_texts, option="--text-a")
    texts_b = read_texts(args.text_b, args.n_texts, option="--text-b")
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
