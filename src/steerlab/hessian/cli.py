"""`steerlab hessian spectrum|density|trace|separate` (argparse). The lead wires `add_subcommands`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from steerlab.io import write_json


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or HF id")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--text", default=None, help="text file (paragraphs separated by blank lines)")
    p.add_argument("--n-texts", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--include", action="append", default=None, help="regex on parameter names (repeatable)")
    p.add_argument("--exclude", action="append", default=None)
    p.add_argument("--layers", default=None, help="comma-separated decoder layers, e.g. 10,11")
    p.add_argument("--part", default="mlp", choices=["mlp", "attention", "block"])
    p.add_argument("--kind", default="hessian", choices=["hessian", "ggn"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="output folder")


def _setup(args):
    from steerlab.hessian.lm import layer_params, read_texts
    from steerlab.hessian.operator import CurvatureOperator
    from steerlab.hessian.params import select_params
    from steerlab.hessian.tasks import lm_batches, lm_task
    from steerlab.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.text is None:
        raise SystemExit("--text is required: a text file to compute the loss on")
    loaded = load_model(args.model, dtype=getattr(torch, args.dtype), attn_implementation="eager")
    model = loaded.model
    if args.layers:
        params = layer_params(model, [int(x) for x in args.layers.split(",")], args.part)
        if args.include or args.exclude:
            keep = select_params(model, args.include, args.exclude)
            params = {n: p for n, p in params.items() if n in keep}
    else:
        params = select_params(model, args.include, args.exclude)
    texts = read_texts(args.text, args.n_texts)
    batches = lm_batches(loaded.tokenizer, texts, args.batch_size, args.max_length)
    op = CurvatureOperator(model, lm_task(), batches, params, kind=args.kind)
    meta = {
        "model": loaded.info.to_dict(),
        "operator": op.describe(),
        "text": str(args.text),
        "n_texts": len(texts),
    }
    print(
        f"operator: {args.kind} over {op.dim:,} parameters in {len(params)} tensors, {len(texts)} texts",
        file=sys.stderr,
    )
    return op, meta


def cmd_spectrum(args) -> None:
    from steerlab.hessian.lanczos import lanczos

    op, meta = _setup(args)
    res = lanczos(
        op.matvec, op.dim, k=args.k, which=args.which, tol=args.tol, max_iter=args.max_iter, seed=args.seed
    )
    res.meta.update(meta)
    res.save(args.out, "spectrum")
    _plot_values(
        res.values.numpy(), Path(args.out) / "spectrum.png", f"top-{args.k} {args.which} {args.kind}"
    )
    print(
        json.dumps(
            {"values": res.values.tolist(), "residuals": res.residuals.tolist(), "n_products": res.n_products}
        )
    )


def cmd_density(args) -> None:
    from steerlab.hessian.density import slq_density
    from steerlab.hessian.report import density_figure

    op, meta = _setup(args)
    dens = slq_density(op.matvec, op.dim, n_probes=args.probes, steps=args.steps, seed=args.seed)
    dens.meta.update(meta)
    dens.save(args.out, "density")
    grid, d = dens.smooth()
    (Path(args.out) / "density.png").write_bytes(density_figure(grid, d))
    lo, hi = dens.support
    print(
        json.dumps(
            {"support": [lo, hi], "integral": float(np.trapezoid(d, grid)), "n_products": dens.n_products}
        )
    )


def cmd_trace(args) -> None:
    from steerlab.hessian.trace import hutchinson, hutchpp

    op, meta = _setup(args)
    fn = hutchpp if args.method == "hutchpp" else hutchinson
    kwargs = {"n_products": args.products} if args.method == "hutchpp" else {"n_probes": args.products}
    est = fn(op.matvec, op.dim, confidence=args.confidence, seed=args.seed, **kwargs)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    est.save(Path(args.out) / "trace.json")
    write_json(Path(args.out) / "trace_meta.json", meta)
    print(json.dumps({"trace": est.estimate, "low": est.low, "high": est.high, "confidence": est.confidence}))


def cmd_separate(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.task == "hybrid-digits":
        from steerlab.hessian.hybrid import HybridConfig, run_experiment
        from steerlab.hessian.report import hybrid_report

        t0 = time.perf_counter()
        result = run_experiment(args.seeds, HybridConfig(t=args.t))
        write_json(out / "hybrid_digits.json", result)
        hybrid_report(result, out)
        summary = {**result["summary"], "seconds": time.perf_counter() - t0}
        print(json.dumps(summary))
        return
    from steerlab.hessian.lm import layer_params, read_texts, two_set_spectra
    from steerlab.models import load_model

    if not (args.text_a and args.text_b):
        raise SystemExit("--task text needs --text-a and --text-b")
    loaded = load_model(args.model, attn_implementation="eager")
    layers = [int(x) for x in (args.layers or "-2,-1").split(",")]
    params = layer_params(loaded.model, layers, args.part)
    res = two_set_spectra(
        loaded.model,
        loaded.tokenizer,
        read_texts(args.text_a, args.n_texts),
        read_texts(args.text_b, args.n_texts),
        params,
        k=args.k,
        max_length=args.max_length,
    )
    for name, eig in res.pop("eigenpairs").items():
        eig.meta.update({"model": loaded.info.to_dict(), "layers": layers, "part": args.part})
        eig.save(out, f"eigenpairs_{name}")
    write_json(out / "separation.json", res)
    print(json.dumps({k: v for k, v in res.items()}))


def _plot_values(values: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(np.arange(1, len(values) + 1), values, marker="o")
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `hessian` with sub-subcommands spectrum|density|trace|separate to an argparse subparsers object."""
    hessian = subparsers.add_parser(
        "hessian", help="Hessian spectra, densities, traces and submodule separation"
    )
    sub = hessian.add_subparsers(dest="hessian_command", required=True)

    p = sub.add_parser("spectrum", help="top-k eigenpairs by Lanczos (with residuals and product counts)")
    _model_args(p)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--which", default="LA", choices=["LA", "SA", "LM", "BE"])
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-iter", type=int, default=200)
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("density", help="spectral density by stochastic Lanczos quadrature")
    _model_args(p)
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.set_defaults(func=cmd_density)

    p = sub.add_parser("trace", help="Hutchinson / Hutch++ trace with a confidence interval")
    _model_args(p)
    p.add_argument("--method", default="hutchpp", choices=["hutchpp", "hutchinson"])
    p.add_argument("--products", type=int, default=60)
    p.add_argument("--confidence", type=float, default=0.95)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("separate", help="separable-submodule analysis (hybrid digits, or two text sets)")
    p.add_argument("--task", default="hybrid-digits", choices=["hybrid-digits", "text"])
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    p.add_argument(
        "--t", type=float, default=4.0, help="perturbation size for unit directions (fixed in advance)"
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text-a", default=None)
    p.add_argument("--text-b", default=None)
    p.add_argument("--n-texts", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--layers", default=None, help="decoder layers (default -2,-1)")
    p.add_argument("--part", default="mlp", choices=["mlp", "attention", "block"])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_separate)
    return hessian


def main(argv: list[str] | None = None) -> None:
    """Stand-alone entry: `python -m steerlab.hessian.cli spectrum ...`."""
    parser = argparse.ArgumentParser(prog="steerlab")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["hessian", *(sys.argv[1:] if argv is None else argv)])
    args.func(args)


if __name__ == "__main__":
    main()
