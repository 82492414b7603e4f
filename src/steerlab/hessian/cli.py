"""`steerlab hessian spectrum|density|trace|separate`: each command reads its options, checks the text
files, the layer list and the output folder before a model loads, and calls the library
(`steerlab.hessian.lm`, `.lanczos`, `.density`, `.trace`, `.hybrid`, `.outputs`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from steerlab.errors import UserError
from steerlab.options import add_model_arguments, parse_dtype, parse_layers


class HessianArgumentsError(UserError):
    """Options of a `steerlab hessian` command that do not fit together."""


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-texts", type=int, default=8, help="paragraphs read from each text file")
    p.add_argument("--max-length", type=int, default=48, help="tokens per paragraph")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="output folder")


def _operator_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--text", required=True, help="text file (UTF-8, paragraphs separated by blank lines)")
    _common_args(p)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--include", action="append", default=None, help="regex on parameter names (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="regex on parameter names (repeatable)")
    p.add_argument("--layers", default=None, help="decoder layers, e.g. 10,11 or 24-29 or -1 (default: all)")
    p.add_argument("--part", default="mlp", choices=["mlp", "attention", "block"])
    p.add_argument("--kind", default="hessian", choices=["hessian", "ggn"])
    p.add_argument("--seed", type=int, default=0)


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _load(args: argparse.Namespace):
    from steerlab.models import load_model

    return load_model(
        args.model, dtype=parse_dtype(args.dtype), device=args.device, attn_implementation="eager"
    )


def _operator(args: argparse.Namespace):
    """(operator, metadata) for the text-file commands; every input is checked before the model loads."""
    from steerlab.hessian.lm import read_texts, text_curvature
    from steerlab.hessian.outputs import check_output_folder

    texts = read_texts(args.text, args.n_texts)
    layers = parse_layers(args.layers, "--layers")
    check_output_folder(args.out)
    _set_threads(args)
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
    print(
        f"operator: {args.kind} over {op.dim:,} parameters in {len(op.params)} tensors, {len(texts)} texts",
        file=sys.stderr,
    )
    return op, meta


def cmd_spectrum(args: argparse.Namespace) -> None:
    from steerlab.hessian.lanczos import lanczos
    from steerlab.hessian.outputs import write_spectrum

    op, meta = _operator(args)
    res = lanczos(
        op.matvec, op.dim, k=args.k, which=args.which, tol=args.tol, max_iter=args.max_iter, seed=args.seed
    )
    res.meta.update(meta)
    print(json.dumps(write_spectrum(res, args.out, f"top-{args.k} {args.which} {args.kind}")))


def cmd_density(args: argparse.Namespace) -> None:
    from steerlab.hessian.density import slq_density
    from steerlab.hessian.outputs import write_density

    op, meta = _operator(args)
    dens = slq_density(op.matvec, op.dim, n_probes=args.probes, steps=args.steps, seed=args.seed)
    dens.meta.update(meta)
    print(json.dumps(write_density(dens, args.out)))


def cmd_trace(args: argparse.Namespace) -> None:
    from steerlab.hessian.outputs import write_trace
    from steerlab.hessian.trace import METHODS

    op, meta = _operator(args)
    est = METHODS[args.method](op.matvec, op.dim, args.products, confidence=args.confidence, seed=args.seed)
    print(json.dumps(write_trace(est, args.out, meta)))


def cmd_separate(args: argparse.Namespace) -> None:
    from steerlab.hessian.outputs import check_output_folder

    if args.task == "hybrid-digits":
        from steerlab.hessian.hybrid import HybridConfig, run_experiment
        from steerlab.hessian.report import hybrid_report

        check_output_folder(args.out)
        _set_threads(args)
        t0 = time.perf_counter()
        result = run_experiment(args.seeds, HybridConfig(t=args.t))
        hybrid_report(result, args.out)
        print(json.dumps({**result["summary"], "seconds": time.perf_counter() - t0}))
        return
    from steerlab.hessian.lm import layer_params, read_texts, two_set_spectra
    from steerlab.hessian.outputs import write_separation

    if not (args.text_a and args.text_b):
        raise HessianArgumentsError("--task text needs --text-a and --text-b (one text file each)")
    texts_a, texts_b = read_texts(args.text_a, args.n_texts), read_texts(args.text_b, args.n_texts)
    layers = parse_layers(args.layers, "--layers")
    check_output_folder(args.out)
    _set_threads(args)
    loaded = _load(args)
    params = layer_params(loaded.model, layers, args.part)
    res = two_set_spectra(
        loaded.model, loaded.tokenizer, texts_a, texts_b, params, k=args.k, max_length=args.max_length
    )
    meta = {"model": loaded.info.to_dict(), "layers": layers, "part": args.part}
    print(json.dumps(write_separation(res, args.out, meta)))


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `hessian` with sub-subcommands spectrum|density|trace|separate to an argparse subparsers object."""
    hessian = subparsers.add_parser(
        "hessian", help="Hessian spectra, densities, traces and submodule separation"
    )
    sub = hessian.add_subparsers(dest="hessian_command", required=True)

    p = sub.add_parser("spectrum", help="top-k eigenpairs by Lanczos (with residuals and product counts)")
    _operator_args(p)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--which", default="LA", choices=["LA", "SA", "LM", "BE"])
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-iter", type=int, default=200)
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("density", help="spectral density by stochastic Lanczos quadrature")
    _operator_args(p)
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.set_defaults(func=cmd_density)

    p = sub.add_parser("trace", help="Hutchinson / Hutch++ trace with a confidence interval")
    _operator_args(p)
    p.add_argument("--method", default="hutchpp", choices=["hutchpp", "hutchinson"])
    p.add_argument("--products", type=int, default=60)
    p.add_argument("--confidence", type=float, default=0.95)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("separate", help="separable-submodule analysis (hybrid digits, or two text sets)")
    p.add_argument("--task", default="hybrid-digits", choices=["hybrid-digits", "text"])
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14], help="hybrid-digits seeds")
    p.add_argument(
        "--t", type=float, default=4.0, help="perturbation size for unit directions (fixed in advance)"
    )
    add_model_arguments(p)
    p.add_argument("--text-a", default=None, help="--task text: first text file")
    p.add_argument("--text-b", default=None, help="--task text: second text file")
    _common_args(p)
    p.add_argument("--layers", default="-2,-1", help="--task text: decoder layers (default -2,-1)")
    p.add_argument("--part", default="mlp", choices=["mlp", "attention", "block"])
    p.add_argument("--k", type=int, default=5)
    p.set_defaults(func=cmd_separate)
    return hessian
