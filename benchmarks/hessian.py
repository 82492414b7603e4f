"""Top-10 Hessian eigenvalues: steerlab.hessian (Lanczos) vs PyHessian (power iteration with deflation).

Ours runs twice per repeat: at tol 1e-3 (PyHessian's default tolerance; ours is a residual test, stricter
than PyHessian's relative-change test) for the headline numbers, and at steerlab's default 1e-6. Same model (a 64-384-256-10 MLP trained on sklearn digits, ~126k parameters, float64), same data (one
batch of 512 digits; both tools keep its first-order graph and reuse it), same machine, one process,
interleaved runs, median of 5. Reference eigenvalues: a long Lanczos run whose residuals certify them
(|error| <= residual; the report prints the bound). Last line: one JSON object.

    PYTHONPATH=src python benchmarks/hessian.py [--repeats 5] [--k 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steerlab.hessian import CurvatureOperator, classification_task, lanczos, select_params


def build(seed: int = 0, n: int = 512):
    from sklearn.datasets import load_digits

    digits = load_digits()
    torch.manual_seed(seed)
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target)
    model = nn.Sequential(
        nn.Linear(64, 384), nn.Tanh(), nn.Linear(384, 256), nn.Tanh(), nn.Linear(256, 10)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(150):  # a partly trained network: a non-trivial spectrum
        opt.zero_grad()
        F.cross_entropy(model(x[n:]), y[n:]).backward()
        opt.step()
    model.eval()
    return model, (x[:n], y[:n])


def ours(model, batch, k: int, tol: float):
    op = CurvatureOperator(model, classification_task(), [batch], select_params(model), cache_graph=True)
    t0 = time.perf_counter()
    res = lanczos(op.matvec, op.dim, k=k, which="LA", tol=tol, seed=0, progress=False)
    return time.perf_counter() - t0, res.values.numpy(), op.n_products


def pyhessian_run(model, batch, k: int):
    import importlib

    ph = importlib.import_module(
        "pyhessian.hessian"
    )  # the module (the package re-exports a class of that name)

    calls = [0]
    original = ph.hessian_vector_product

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counting
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its probes come from torch.randn: match the float64 model
    try:
        t0 = time.perf_counter()
        comp = ph.hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False)
        values, _ = comp.eigenvalues(top_n=k)
        seconds = time.perf_counter() - t0
    finally:
        ph.hessian_vector_product = original
        torch.set_default_dtype(previous)
    return seconds, np.sort(np.array(values))[::-1], calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--tol", type=float, default=1e-3, help="our residual tolerance; PyHessian's default tol is 1e-3"
    )
    parser.add_argument(
        "--tight-tol", type=float, default=1e-6, help="second run of ours at steerlab's default"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batch = build()
    n_params = sum(p.numel() for p in model.parameters())
    op = CurvatureOperator(model, classification_task(), [batch], select_params(model), cache_graph=True)
    ref = lanczos(op.matvec, op.dim, k=args.k, which="LA", tol=1e-12, max_iter=400, seed=123, progress=True)
    exact = ref.values.numpy()
    bound = float((ref.residuals / ref.values.abs()).max())
    print(
        f"params={n_params} reference top-{args.k}: {np.array2string(exact, precision=6)} (rel residual <= {bound:.1e})"
    )
    tols = {"ours": args.tol, "ours_tight": args.tight_tol}
    times = {name: [] for name in [*tols, "pyhessian"]}
    errors = {name: [] for name in times}
    hvps = {name: [] for name in times}
    for rep in range(args.repeats):  # interleaved, so load changes hit every tool alike
        line = []
        for name in times:
            if name == "pyhessian":
                s, vals, n = pyhessian_run(model, batch, args.k)
            else:
                s, vals, n = ours(model, batch, args.k, tols[name])
            times[name].append(s)
            hvps[name].append(n)
            errors[name].append(float(np.max(np.abs(vals - exact) / np.abs(exact))))
            line.append(f"{name} {s:.2f}s {n} HVPs err {errors[name][-1]:.1e}")
        print(f"rep {rep}: " + " | ".join(line))
    med = {name: statistics.median(v) for name, v in times.items()}
    med_hvp = {name: statistics.median(v) for name, v in hvps.items()}
    result = {
        "n_params": n_params,
        "k": args.k,
        "repeats": args.repeats,
        "tol": args.tol,
        "speedup_vs_pyhessian": med["pyhessian"] / med["ours"],
        "hvp_ratio_vs_pyhessian": med_hvp["pyhessian"] / med_hvp["ours"],
        "ours_max_rel_err": max(errors["ours"]),
        "pyhessian_max_rel_err": max(errors["pyhessian"]),
        "ours_seconds_median": med["ours"],
        "pyhessian_seconds_median": med["pyhessian"],
        "ours_hvps": med_hvp["ours"],
        "pyhessian_hvps": med_hvp["pyhessian"],
        "tight_tol": args.tight_tol,
        "tight_speedup_vs_pyhessian": med["pyhessian"] / med["ours_tight"],
        "tight_hvp_ratio_vs_pyhessian": med_hvp["pyhessian"] / med_hvp["ours_tight"],
        "tight_max_rel_err": max(errors["ours_tight"]),
        "reference_rel_residual_bound": bound,
        "threads": args.threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
