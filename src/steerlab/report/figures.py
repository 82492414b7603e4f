"""Matplotlib figures without pyplot: no backend is chosen or changed, so importing steerlab never
touches a user's notebook or GUI settings; PNGs are written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from steerlab.io import atomic_writer


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, **kwargs):
    """(figure, axes) like `plt.subplots`, but detached from pyplot's figure manager."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def figure_png(fig, dpi: int = 110) -> bytes:
    """A figure as PNG bytes; a pyplot-managed figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    if getattr(fig.canvas, "manager", None) is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return buffer.getvalue()


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure to `path` atomically (a complete PNG or none at all)."""
    png = figure_png(fig, dpi)
    with atomic_writer(path) as tmp:
        tmp.write_bytes(png)
    return Path(path)


def plain_text(text: str) -> str:
    """`text` escaped so that matplotlib draws it as is: a `$` in user text starts no mathtext."""
    return text.replace("$", r"\$")
