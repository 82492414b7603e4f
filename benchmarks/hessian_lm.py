"""The Gauss-Newton curvature of ALL MLP weights of the embedded LM (SmolLM2-135M-Instruct) on WikiText-2.

Stages (each in its own process, so its peak RSS from resource.getrusage is its own; every stage writes
OUT/<stage>.json and is skipped when that file exists):

  spectrum  top-k GGN eigenpairs by Lanczos (`steerlab hessian spectrum`: float32 Krylov basis in a file,
            the Lanczos state checkpointed every 2 products in OUT/spectrum/checkpoint, from which a rerun
            resumes; a rerun with a smaller --max-iter stops at the products already made). The density
            is the stochastic Lanczos quadrature of the same run (`tridiagonal_density`: the run from its
            random start is one SLQ probe), written to OUT/spectrum/density.*
  sharding  seconds per GGN-vector product, 1 process vs 2 gloo processes under torchrun, on the MLPs of
            the last --shard-layers layers (the baseline is the 1-process time measured in the same run)

Data: the first --sequences x --tokens tokens of wikitext-2/valid.txt read as one stream. Ends with one
JSON line. Example (the docs' figures):

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/hessian_lm.py --out results/hessian_lm
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "corpus" / "wikitext-2" / "valid.txt"
STAGES = ("spectrum", "sharding")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def common(a: argparse.Namespace, out: Path) -> dict:
    return dict(
        text=a.text,
        out=out,
        stream=True,
        n_texts=a.sequences,
        max_length=a.tokens,
        batch_size=a.batch_size,
        kind="ggn",
        part="mlp",
        layers=a.layers,
        cache_graph=True,
        seed=a.seed,
        progress=True,
    )


def run_spectrum(a: argparse.Namespace) -> dict:
    from steerlab.hessian.commands import SpectrumArgs, spectrum
    from steerlab.hessian.density import tridiagonal_density
    from steerlab.hessian.outputs import write_density

    out = Path(a.out) / "spectrum"
    resumed = (out / "checkpoint" / "spectrum" / "state.safetensors").exists()
    t0 = time.perf_counter()
    summary = spectrum(
        SpectrumArgs(
            **common(a, out),
            k=a.k,
            tol=a.tol,
            max_iter=a.max_iter,
            basis_dtype="float32",
            checkpoint_every=2,
        )
    )
    meta = json.loads((out / "spectrum.json").read_text())
    dens = tridiagonal_density(meta["alphas"], meta["betas"], {"source": "the spectrum's Lanczos run"})
    density = write_density(dens, out, "density")
    return {
        "seconds": time.perf_counter() - t0,
        "lanczos_seconds": meta["seconds"],
        "resumed": resumed,  # then the seconds and peak RSS are those of the resumed part only
        "iterations": meta["iterations"],
        "converged": meta["converged"],
        "dim": meta["operator"]["dim"],
        "values": summary["values"],
        "residuals": summary["residuals"],
        "density_support": density["support"],
        "density_nodes": dens.nodes[0].tolist(),
        "density_weights": dens.weights[0].tolist(),
        "peak_rss_mib": peak_rss_mib(),
    }


def spectrum_figure(spec: dict, path: Path) -> None:
    """Left: the top Ritz values with their residual norms as error bars (an eigenvalue lies within the
    residual of each); right: the one-probe SLQ nodes and weights (log scale, so outliers stay visible)."""
    from steerlab.report.figures import new_figure, save_png

    fig, (left, right) = new_figure((9, 3.2), ncols=2)
    index = range(1, len(spec["values"]) + 1)
    left.errorbar(index, spec["values"], yerr=spec["residuals"], fmt="o", capsize=3)
    left.set(
        xlabel="index",
        ylabel="Ritz value",
        title=f"top GGN eigenvalues, {spec['iterations']} Lanczos iterations",
    )
    nodes = [max(x, 1e-8) for x in spec["density_nodes"]]
    right.vlines(nodes, 1e-12, spec["density_weights"])
    right.plot(nodes, spec["density_weights"], "o", ms=3)
    right.set(xscale="symlog", yscale="log", ylim=(1e-12, 2), xlabel="eigenvalue", ylabel="SLQ weight")
    right.set_title("spectral density: nodes and weights (one probe)")
    save_png(fig, path)


def gvp_seconds(a: argparse.Namespace) -> dict:
    """Seconds per GGN product on this process's share (run by 1 process or by each of 2 under torchrun)."""
    import torch

    from steerlab import distributed, load_model
    from steerlab.hessian.lm import layer_params, text_operator, token_chunks

    distributed.init("gloo")
    loaded = load_model(attn_implementation="eager")
    seqs = token_chunks(loaded.tokenizer, a.text, a.shard_sequences, a.tokens)
    layers = list(range(-a.shard_layers, 0))
    params = layer_params(loaded.model, layers, "mlp")
    op = text_operator(loaded.model, None, seqs, params, kind="ggn", batch_size=1, shard=True)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    op.matvec(v)  # warm-up
    distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(a.shard_products):
        w = op.matvec(v)
    seconds = (time.perf_counter() - t0) / a.shard_products
    return {"gvp_seconds": seconds, "dim": op.dim, "processes": distributed.world_size(), "vGv": float(v @ w)}


def run_sharding(a: argparse.Namespace) -> dict:
    base = [sys.executable, str(Path(__file__).resolve()), "--child", "gvp", *passthrough(a)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = json.loads(
        subprocess.run(base, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    )
    two_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *base[1:]]
    two_out = subprocess.run(two_cmd, env=env, check=True, capture_output=True, text=True).stdout
    two = json.loads([line for line in two_out.splitlines() if line.startswith("{")][-1])
    return {
        "one_process_gvp_seconds": one["gvp_seconds"],
        "two_process_gvp_seconds": two["gvp_seconds"],
        "speedup": one["gvp_seconds"] / two["gvp_seconds"],
        "same_product": abs(one["vGv"] - two["vGv"]) <= 1e-6 * abs(one["vGv"]),
        "dim": one["dim"],
        "threads_per_process": 1,
    }


def passthrough(a: argparse.Namespace) -> list[str]:
    return [
        "--out", a.out, "--text", str(a.text), "--tokens", str(a.tokens),
        "--shard-layers", str(a.shard_layers), "--shard-sequences", str(a.shard_sequences),
        "--shard-products", str(a.shard_products),
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/hessian_lm")
    p.add_argument("--text", type=Path, default=WIKI)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--layers", default=None, help="decoder layers whose MLPs are used (default: all)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-layers", type=int, default=2)
    p.add_argument("--shard-sequences", type=int, default=4)
    p.add_argument("--shard-products", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child == "gvp":
        result = gvp_seconds(a)
        from steerlab import distributed

        if distributed.is_main():
            print(json.dumps(result))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.child in STAGES:
        result = {"spectrum": run_spectrum, "sharding": run_sharding}[a.child](a)
        (out / f"{a.child}.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    args = sys.argv[1:]
    for stage in a.stages:
        if not (out / f"{stage}.json").exists():
            subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), *args, "--child", stage], check=True
            )
    got = {s: json.loads((out / f"{s}.json").read_text()) for s in STAGES if (out / f"{s}.json").exists()}
    spec, shard = got.get("spectrum", {}), got.get("sharding", {})
    if spec:
        spectrum_figure(spec, out / "spectrum_summary.png")
    summary = {
        "mlp_params": spec.get("dim"),
        "tokens": a.sequences * a.tokens,
        "gvp_seconds": spec["lanczos_seconds"] / spec["iterations"] if spec and not spec["resumed"] else None,
        "top_eigenvalue": spec["values"][0] if spec else None,
        "top_eigenvalues": spec.get("values"),
        "lanczos_iters": spec.get("iterations"),
        "lanczos_converged": spec.get("converged"),
        "spectrum_seconds": spec.get("seconds"),
        "density_support": spec.get("density_support"),
        "peak_rss_mib": spec.get("peak_rss_mib"),
        "sharded_2rank_speedup": shard.get("speedup"),
        "sharded_same_product": shard.get("same_product"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
