"""The sweep heat-map: the behaviour score over layers x strengths (steering vector rows only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from steerlab.report.figures import new_figure


def heatmap(rows: Sequence[dict], x: str = "fraction"):
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
