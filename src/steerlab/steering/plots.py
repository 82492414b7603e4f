"""Plots of sweep rows (the tidy dicts written to sweep.csv)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np

from steerlab.report.figures import new_figure


def _select(rows, **conditions):
    return [r for r in rows if all(r[k] == v for k, v in conditions.items())]


def _baseline(rows, split):
    base = _select(rows, split=split, vector="none")
    return base[0]["score"] if base else None


X_LABELS = {
    "fraction": "multiplier as signed fraction of the residual norm (||m·v|| / ||h||)",
    "multiplier": "multiplier m (adds m·v)",
}


def score_vs_fraction(rows: Sequence[dict], split: str, metric_label: str, x: str = "fraction"):
    """One line per layer (steering) plus the random control, against the signed fraction of residual norm
    (`x="fraction"`) or the raw multiplier (`x="multiplier"`)."""
    fig, ax = new_figure(figsize=(7.5, 4.5))
    layers = sorted({r["layer"] for r in _select(rows, split=split)})
    cmap = matplotlib.colormaps["viridis"]
    base = _baseline(rows, split)
    for i, layer in enumerate(layers):
        color = cmap(i / max(1, len(layers) - 1))
        for kind, style in (("steering", "-o"), ("random", ":x")):
            pts = sorted((r[x], r["score"]) for r in _select(rows, split=split, layer=layer, vector=kind))
            if base is not None:
                pts = sorted([*pts, (0.0, base)])
            if pts:
                label = (
                    f"layer {layer}"
                    if kind == "steering"
                    else (f"random, layer {layer}" if len(layers) == 1 else None)
                )
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    style,
                    color=color,
                    ms=4,
                    label=label,
                    alpha=0.9 if kind == "steering" else 0.6,
                )
    if base is not None:
        ax.axhline(base, color="grey", lw=1, ls="--", label="unsteered")
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(metric_label)
    ax.set_title(f"{metric_label} against multiplier ({split}); dotted: random vector of the same norm")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig


def score_vs_layer(rows: Sequence[dict], split: str, metric_label: str):
    """Effect score(+f) - score(-f) per layer for the largest fraction, steering vs random."""
    fig, ax = new_figure(figsize=(7.5, 4))
    fmax = max(r["fraction"] for r in _select(rows, split=split, vector="steering"))
    for kind, style in (("steering", "-o"), ("random", ":x")):
        pts = []
        for layer in sorted({r["layer"] for r in _select(rows, split=split, vector=kind)}):
            plus = _select(rows, split=split, vector=kind, layer=layer, fraction=fmax)
            minus = _select(rows, split=split, vector=kind, layer=layer, fraction=-fmax)
            if plus and minus:
                pts.append((layer, plus[0]["score"] - minus[0]["score"]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{kind} vector")
    if "auroc" in rows[0]:
        ax2 = ax.twinx()
        layers = sorted({r["layer"] for r in _select(rows, split=split)})
        auroc = [next(r["auroc"] for r in rows if r["layer"] == layer) for layer in layers]
        ax2.plot(layers, auroc, "--", color="tab:green", alpha=0.6, label="separability (AUROC)")
        ax2.set_ylabel("AUROC of held-out pairs projected on v")
        ax2.set_ylim(0.4, 1.02)
        ax2.legend(loc="lower right", fontsize=8)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{metric_label}(+f) − {metric_label}(−f)")
    ax.set_title(f"Effect per layer at f = ±{fmax:g} ({split})")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def side_effect_plot(rows: Sequence[dict], split: str):
    fig, ax = new_figure(figsize=(7.5, 3.6))
    for layer in sorted({r["layer"] for r in _select(rows, split=split, vector="steering")}):
        pts = sorted(
            (r["fraction"], r["perplexity"])
            for r in _select(rows, split=split, layer=layer, vector="steering")
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, label=f"layer {layer}")
    base = _select(rows, split=split, vector="none")
    if base:
        ax.axhline(base[0]["perplexity"], color="grey", ls="--", lw=1, label="unsteered")
    ax.set_xlabel("signed fraction of the residual norm")
    ax.set_ylabel("perplexity on neutral text")
    ax.set_title(f"Side effect: perplexity ({split})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig


def score_heatmap(rows: Sequence[dict], x: str = "fraction"):
    """Score of the steering vector at every (layer, strength), the unsteered score as strength 0."""
    steering = [r for r in rows if r["vector"] == "steering"]
    base = next((r["score"] for r in rows if r["vector"] == "none"), None)
    layers = sorted({r["layer"] for r in steering})
    strengths = sorted({r[x] for r in steering} | ({0.0} if base is not None else set()))
    grid = np.full((len(layers), len(strengths)), np.nan)
    for r in steering:
        grid[layers.index(r["layer"]), strengths.index(r[x])] = r["score"]
    if base is not None:
        grid[:, strengths.index(0.0)] = base
    fig, ax = new_figure(figsize=(1.6 + 0.75 * len(strengths), 1.4 + 0.45 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", origin="lower")
    ax.set_xticks(range(len(strengths)), [f"{s:g}" for s in strengths])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    for i in range(len(layers)):
        for j in range(len(strengths)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("signed fraction of the residual norm" if x == "fraction" else "multiplier m")
    ax.set_ylabel("layer")
    ax.set_title("behaviour score (steering vector)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
