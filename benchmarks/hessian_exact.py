"""Estimators vs the exact dense Hessian of a small float64 model (MLP 64-24-10 on sklearn digits).

Top-10 eigenvalues at both ends (relative error), Hutchinson and Hutch++ traces vs their confidence
intervals (over 20 seeds: empirical coverage), SLQ density (integral and support). Writes figures to
--img. Last line: one JSON object.

    PYTHONPATH=src python benchmarks/hessian_exact.py [--img docs/img]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steerlab.hessian import (
    CurvatureOperator,
    classification_task,
    dense_matrix,
    hutchinson,
    hutchpp,
    lanczos,
    select_params,
    slq_density,
)
from steerlab.hessian.report import density_figure
from steerlab.report.figures import save_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img", default="docs/img")
    parser.add_argument("--trace-seeds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    batches = [(x[i : i + 300], y[i : i + 300]) for i in range(0, 900, 300)]
    op = CurvatureOperator(model, classification_task(), batches, select_params(model), cache_graph=True)
    h = dense_matrix(op)
    evals = torch.linalg.eigvalsh(h).numpy()
    exact = np.concatenate([evals[::-1][:10], evals[:10]])
    res = lanczos(op.matvec, op.dim, k=10, which="BE", tol=1e-10, seed=0)
    rel = np.abs(res.values.numpy() - exact) / np.abs(exact)
    trace = float(np.trace(h.numpy()))
    coverage = {}
    widths = {}
    for name, fn, kw in (
        ("hutchinson", hutchinson, {"n_probes": 60}),
        ("hutchpp", hutchpp, {"n_products": 60}),
    ):
        ests = [fn(op.matvec, op.dim, seed=s, progress=False, **kw) for s in range(args.trace_seeds)]
        coverage[name] = float(np.mean([e.low <= trace <= e.high for e in ests]))
        widths[name] = float(np.median([(e.high - e.low) / abs(trace) for e in ests]))
        first = ests[0]
        print(
            f"{name}: {first.estimate:.5f} [{first.low:.5f}, {first.high:.5f}] exact {trace:.5f}; "
            f"coverage of 95% CI over {args.trace_seeds} seeds {coverage[name]:.2f}, median rel width {widths[name]:.3f}"
        )
    dens = slq_density(op.matvec, op.dim, n_probes=8, steps=80, seed=0)
    grid, d = dens.smooth()
    integral = float(np.trapezoid(d, grid))
    lo, hi = dens.support
    save_png(density_figure(grid, d, exact=evals), Path(args.img) / "hessian_density.png")
    result = {
        "dim": op.dim,
        "top10_both_ends_max_rel_err": float(rel.max()),
        "lanczos_products": res.n_products,
        "exact_trace": trace,
        "hutchinson_ci_coverage": coverage["hutchinson"],
        "hutchpp_ci_coverage": coverage["hutchpp"],
        "hutchinson_median_rel_ci_width": widths["hutchinson"],
        "hutchpp_median_rel_ci_width": widths["hutchpp"],
        "slq_integral": integral,
        "slq_support": [lo, hi],
        "exact_extremes": [float(evals[0]), float(evals[-1])],
        "slq_mean_vs_exact": [dens.moment(1), float(evals.mean())],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
