"""Peak memory of Lanczos top-k at 5.3 M parameters: float64 basis in RAM (before) vs float32 / file-backed.

Default configurations: float64 in RAM (the baseline), float32 in RAM, float32 in a file (--configs adds
float64_file).

Each configuration runs in its own subprocess, so its peak RSS (resource.getrusage ru_maxrss) is clean;
the figure reported is the peak during Lanczos minus the peak before it (Python + torch + the operator).
The operator is diagonal with a planted spectrum (the top-5 Hessian eigenvalues measured on the MLPs of
SmolLM2's last two layers, then a decaying bulk), dimension 5 308 416 = those two MLPs: the basis is what
dominates memory, not the product, and the known spectrum gives the error. 60 iterations are forced
(min_iter = max_iter = 60) in every configuration, so all do identical work. Last line: one JSON object.

    PYTHONPATH=src python benchmarks/hessian_memory.py [--dim 5308416] [--iters 60] [--basis-dir results/krylov]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TOP = [48.39, 38.70, 18.58, 11.82, 6.80]
CONFIGS = {
    "float64_ram": ("float64", False),
    "float32_ram": ("float32", False),
    "float64_file": ("float64", True),
    "float32_file": ("float32", True),
}


def spectrum(dim: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    bulk = 6.0 * torch.exp(-torch.arange(dim - len(TOP), dtype=torch.float64) / 40.0)
    bulk = bulk * (1 + 0.01 * torch.rand(dim - len(TOP), generator=gen, dtype=torch.float64))
    return torch.cat([torch.tensor(TOP, dtype=torch.float64), bulk])


def child(args: argparse.Namespace) -> None:
    import torch

    from steerlab.hessian import lanczos

    torch.set_num_threads(1)
    d = spectrum(args.dim)
    dtype, on_disk = CONFIGS[args.child]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = lanczos(
        lambda v: d * v,
        args.dim,
        k=5,
        tol=1e-12,
        min_iter=args.iters,
        max_iter=args.iters,
        progress=False,
        basis_dtype=getattr(torch, dtype),
        basis_dir=args.basis_dir if on_disk else None,
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = max(abs(v - t) / t for v, t in zip(res.values.tolist(), TOP))
    rel_res = float(res.residuals.max() / res.values.abs().max())
    out = {"before_mib": before / 1024, "peak_mib": peak / 1024, "seconds": seconds, "max_rel_err": err}
    print(json.dumps({**out, "lanczos_mib": (peak - before) / 1024, "max_rel_residual": rel_res}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=5_308_416)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--basis-dir", default="results/krylov")
    parser.add_argument(
        "--configs", nargs="+", choices=list(CONFIGS), default=["float64_ram", "float32_ram", "float32_file"]
    )
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    runs = {}
    for name in args.configs:
        cmd = [sys.executable, __file__, "--child", name, "--dim", str(args.dim), "--iters", str(args.iters)]
        out = subprocess.run(
            [*cmd, "--basis-dir", args.basis_dir], capture_output=True, text=True, check=True
        )
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            name,
            {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in runs[name].items()},
            flush=True,
        )
    base = runs["float64_ram"]["lanczos_mib"] if "float64_ram" in runs else float("nan")
    result = {
        "dim": args.dim,
        "iterations": args.iters,
        "basis_float64_gib_theory": args.iters * args.dim * 8 / 2**30,
        "before_lanczos_mib": next(iter(runs.values()))["before_mib"],
        **{f"{name}_lanczos_mib": r["lanczos_mib"] for name, r in runs.items()},
        **{f"{name}_seconds": r["seconds"] for name, r in runs.items()},
        **{f"{name}_max_rel_err": r["max_rel_err"] for name, r in runs.items()},
        **{
            f"{name}_memory_ratio": r["lanczos_mib"] / base
            for name, r in runs.items()
            if name != "float64_ram"
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
