"""Where hessian results go: one writer per kind of result (safetensors + JSON, plots), every file
written atomically. Each writer returns the one-line summary the command prints."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from steerlab.hessian.density import SpectralDensity
from steerlab.hessian.lanczos import Eigenpairs
from steerlab.hessian.report import density_figure, spectrum_figure
from steerlab.hessian.trace import TraceEstimate
from steerlab.io import write_json
from steerlab.report.figures import save_png


def write_spectrum(eig: Eigenpairs, folder: str | os.PathLike, title: str, name: str = "spectrum") -> dict:
    """`NAME.safetensors` + `NAME.json` and a plot `NAME.png` of the eigenvalues."""
    eig.save(folder, name)
    save_png(spectrum_figure(eig.values.numpy(), title), Path(folder) / f"{name}.png")
    return {"values": eig.values.tolist(), "residuals": eig.residuals.tolist(), "n_products": eig.n_products}


def write_density(dens: SpectralDensity, folder: str | os.PathLike, name: str = "density") -> dict:
    """`NAME.safetensors` + `NAME.json` and a plot `NAME.png` of the smoothed density."""
    dens.save(folder, name)
    grid, smooth = dens.smooth()
    save_png(density_figure(grid, smooth), Path(folder) / f"{name}.png")
    lo, hi = dens.support
    return {"support": [lo, hi], "integral": float(np.trapezoid(smooth, grid)), "n_products": dens.n_products}


def write_trace(est: TraceEstimate, folder: str | os.PathLike, meta: dict) -> dict:
    """`trace.json` (the estimate) and `trace_meta.json` (what it is the trace of)."""
    est.save(Path(folder) / "trace.json")
    write_json(Path(folder) / "trace_meta.json", meta)
    return {"trace": est.estimate, "low": est.low, "high": est.high, "confidence": est.confidence}


def write_separation(result: dict, folder: str | os.PathLike, meta: dict) -> dict:
    """The two text sets' eigenpairs (`eigenpairs_a`, `eigenpairs_b`, with `meta`) and `separation.json`
    (everything else in a `two_set_spectra` result), which is also returned."""
    summary = {key: value for key, value in result.items() if key != "eigenpairs"}
    for name, eig in result["eigenpairs"].items():
        eig.meta.update(meta)
        eig.save(folder, f"eigenpairs_{name}")
    write_json(Path(folder) / "separation.json", summary)
    return summary
