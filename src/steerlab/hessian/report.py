"""Figures (matplotlib, without pyplot) and a self-contained HTML report for hessian results."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from steerlab.io import atomic_write_text, write_json
from steerlab.report.figures import new_figure, save_png
from steerlab.report.html import page, png_html


def spectrum_figure(values: np.ndarray, title: str) -> Figure:
    """Eigenvalues against their index."""
    fig, ax = new_figure((5, 3))
    ax.plot(np.arange(1, len(values) + 1), values, marker="o")
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title, fontsize=9)
    return fig


def sweep_figure(result: dict) -> Figure:
    """Accuracy vs t along the targeted directions (mean ± sd over seeds, ±t averaged)."""
    runs = result["runs"]
    fig, axes = new_figure((10, 3.6), 1, 2, sharey=True)
    for ax, dname, title in zip(
        axes,
        ("pattern_dir", "digit_dir"),
        ("pattern direction (digit top-k projected out)", "digit direction (pattern top-k projected out)"),
    ):
        ts = np.array(runs[0]["sweeps"][dname]["t"])
        for metric, color in (("digit", "tab:blue"), ("pattern", "tab:orange")):
            vals = np.array([r["sweeps"][dname][metric] for r in runs])
            ax.plot(ts, vals.mean(0), color=color, label=f"{metric} accuracy")
            ax.fill_between(
                ts, vals.mean(0) - vals.std(0), vals.mean(0) + vals.std(0), color=color, alpha=0.2
            )
        ax.axvline(result["config"]["t"], color="gray", ls="--", lw=1, label="fixed t")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("t (unit direction, ±t averaged)")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    return fig


def specialisation_figure(result: dict) -> Figure:
    """r = v^T G_D v / (v^T G_D v + v^T G_P v) for the mixed-Hessian eigenvectors vs the unsupervised method."""
    fig, ax = new_figure((6, 3.4))
    bins = np.linspace(0, 1, 21)
    mix = np.concatenate([r["r_mix_top"] for r in result["runs"]])
    ica = np.concatenate([r["r_ica"] for r in result["runs"]])
    ax.hist(mix, bins=bins, alpha=0.5, label="top-20 eigenvectors of mixed Hessian")
    ax.hist(ica, bins=bins, alpha=0.5, label="curvature ICA (mixed inputs only)")
    if "r_equalised" in result["runs"][0]:
        eq = np.concatenate([r["r_equalised"] for r in result["runs"]])
        ax.hist(eq, bins=bins, alpha=0.5, label="equalised GGN + ICA (mixed inputs only)")
    for x in (0.1, 0.9):
        ax.axvline(x, color="gray", ls="--", lw=1)
    ax.set_xlabel("r (0 = pattern-only curvature, 1 = digit-only)")
    ax.set_ylabel("directions (all seeds)")
    ax.legend(fontsize=8)
    return fig


def spectra_figure(result: dict) -> Figure:
    """Mean top eigenvalues over seeds of the Hessian on each data subset."""
    fig, ax = new_figure((6, 3.4))
    for name in ("digit", "pattern", "mix"):
        vals = np.array([r["eigenvalues"][name] for r in result["runs"]])
        ax.semilogy(
            np.arange(1, vals.shape[1] + 1), vals.mean(0), marker="o", ms=3, label=f"H on {name} data"
        )
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=8)
    return fig


def density_figure(grid: np.ndarray, dens: np.ndarray, exact: np.ndarray | None = None) -> Figure:
    """A smoothed spectral density (log scale), over a histogram of `exact` eigenvalues if given."""
    fig, ax = new_figure((6, 3.4))
    if exact is not None:
        ax.hist(exact, bins=80, density=True, alpha=0.4, label="exact eigenvalues")
    ax.plot(grid, dens, label="SLQ density")
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(dens.max() * 1e-6, 1e-8))
    ax.set_xlabel("eigenvalue")
    ax.legend(fontsize=8)
    return fig


def write_html(path: str | os.PathLike, title: str, sections: list[tuple[str, str | bytes]]) -> Path:
    """`sections`: (heading, html text or PNG bytes). Written atomically."""
    body = [(heading, png_html(part) if isinstance(part, bytes) else part) for heading, part in sections]
    atomic_write_text(path, page(title, body))
    return Path(path)


def summary_table(summary: dict) -> str:
    rows = []
    for key, val in summary.items():
        if key.endswith("_sd") or key == "n_seeds":
            continue
        sd = summary.get(f"{key}_sd")
        rows.append(
            f"<tr><td>{html.escape(key)}</td><td>{val:.3f}</td><td>{'' if sd is None else f'{sd:.3f}'}</td></tr>"
        )
    return (
        "<table><tr><th>quantity</th><th>mean (max for random)</th><th>sd</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def hybrid_report(result: dict, folder: str | os.PathLike) -> Path:
    """`hybrid_digits.json`, the figures as PNG files and one self-contained report.html in `folder`,
    each written atomically."""
    folder = Path(folder)
    write_json(folder / "hybrid_digits.json", result)
    figures = {
        "sweeps": sweep_figure(result),
        "specialisation": specialisation_figure(result),
        "spectra": spectra_figure(result),
    }
    figs = {name: save_png(fig, folder / f"hybrid_{name}.png").read_bytes() for name, fig in figures.items()}
    config = html.escape(json.dumps(result["config"], indent=1))
    return write_html(
        folder / "report.html",
        "Hybrid digits: Hessian separation of two independent skills",
        [
            ("Summary over seeds", summary_table(result["summary"])),
            ("Targeted perturbation sweeps", figs["sweeps"]),
            ("Specialisation of directions", figs["specialisation"]),
            ("Top eigenvalues", figs["spectra"]),
            ("Configuration (fixed in advance)", f"<pre>{config}</pre>"),
        ],
    )
