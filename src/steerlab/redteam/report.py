"""The red-teaming report: ASR-vs-eps curves per layer and method (PNG), a tidy CSV and one HTML page
with the tables and replies side by side."""

from __future__ import annotations

import html
from pathlib import Path

from matplotlib.ticker import NullFormatter

from steerlab.io import atomic_write_text
from steerlab.redteam.metrics import asr_table, base_row, minimal_eps_rows, write_csv
from steerlab.redteam.result import RedteamResult
from steerlab.report.figures import new_figure, plain_text, save_png
from steerlab.report.html import figure_html, page, table_html

COLOURS = {
    "optimised": "#d62728",
    "per-prompt": "#9467bd",
    "diff-of-means": "#1f77b4",
    "melbo": "#2ca02c",
    "random": "#7f7f7f",
}


def asr_figure(rows: list[dict], base_asr: float | None = None, title: str = "attack success rate"):
    """One panel per layer: ASR against eps for each method (95% bootstrap band; random: pooled mean and
    the best single direction, dashed)."""
    layers = sorted({r["layer"] for r in rows})
    cols = min(len(layers), 4) or 1
    nrows = (len(layers) + cols - 1) // cols or 1
    fig, axes = new_figure((3.4 * cols, 2.8 * nrows), nrows, cols, squeeze=False, sharey=True)
    for index, layer in enumerate(layers):
        ax = axes[index // cols][index % cols]
        for method, colour in COLOURS.items():
            mine = sorted(
                (r for r in rows if r["layer"] == layer and r["method"] == method), key=lambda r: r["eps"]
            )
            if not mine:
                continue
            eps = [r["eps"] for r in mine]
            ax.plot(eps, [r["asr"] for r in mine], marker="o", ms=3, color=colour, label=method)
            ax.fill_between(
                eps, [r["asr_low"] for r in mine], [r["asr_high"] for r in mine], color=colour, alpha=0.15
            )
            if method == "random":
                ax.plot(
                    eps, [r["asr_max"] for r in mine], ls="--", color=colour, label="random (best of all)"
                )
        if base_asr is not None:
            ax.axhline(base_asr, color="black", lw=0.8, ls=":", label="unperturbed")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({r["eps"] for r in rows}), [f"{e:g}" for e in sorted({r["eps"] for r in rows})])
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("eps (fraction of residual norm)", fontsize=8)
        ax.set_ylabel("ASR", fontsize=8)
    for index in range(len(layers), nrows * cols):
        axes[index // cols][index % cols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, bbox_to_anchor=(0.5, -0.02)
    )
    fig.suptitle(plain_text(title), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _replies_table(result: RedteamResult, layer: int, eps: float, limit: int = 6) -> str:
    prompts = result.config.get("harmful_test_prompts", [])
    columns = ["prompt", "unperturbed"] + [m for m in result.methods]
    rows = []
    for i in range(min(limit, len(prompts))):
        row = {"prompt": prompts[i], "unperturbed": _at(result.base.get("generations", []), i)}
        for method in result.methods:
            cell = result.cell(method, layer, eps)
            row[method] = _at(cell.generations[0], i) if cell is not None and cell.generations else ""
        rows.append(row)
    return table_html(rows, columns, css_class="gen")


def _at(items: list, i: int) -> str:
    return items[i] if i < len(items) else ""


def write_report(
    result: RedteamResult, out: str | Path, layer: int | None = None, eps: float | None = None
) -> dict:
    """asr.csv, minimal_eps.csv, asr_vs_eps.png and report.html in `out`; returns their paths."""
    out = Path(out)
    rows = asr_table(result)
    base = base_row(result)
    csv_path = write_csv(rows, out / "asr.csv")
    min_rows = minimal_eps_rows(result)
    min_path = write_csv(
        min_rows,
        out / "minimal_eps.csv",
        columns=("method", "layer", "n_prompts", "broken", "median_min_eps"),
    )
    judge = result.config.get("judge", "")
    title = f"ASR vs eps ({result.config.get('model', '')}, judge {judge})"
    png = save_png(asr_figure(rows, base["asr"], title), out / "asr_vs_eps.png")
    layer = (
        layer if layer is not None else (result.layers[len(result.layers) // 2] if result.layers else None)
    )
    eps = eps if eps is not None else (result.eps_values[-1] if result.eps_values else None)
    config = {k: v for k, v in result.config.items() if not k.endswith("_prompts")}
    sections = [
        (
            "",
            "<p>ASR = fraction of held-out harmful prompts the judge does not call a refusal. Universal "
            "vectors are trained on the train prompts only; per-prompt perturbations are optimised on each "
            "test prompt (an upper bound). eps = perturbation norm / mean residual norm at the layer.</p>",
        ),
        ("Settings", "<pre>" + html.escape("\n".join(f"{k}: {v}" for k, v in config.items())) + "</pre>"),
        ("Unperturbed model", table_html([base])),
        (
            "ASR against eps",
            figure_html(asr_figure(rows, base["asr"], title), "95% bootstrap bands over prompts"),
        ),
        ("All cells", table_html(rows)),
        ("Minimal eps per prompt", table_html(min_rows)),
    ]
    if layer is not None and eps is not None:
        sections.append((f"Replies at layer {layer}, eps {eps:g}", _replies_table(result, layer, eps)))
    page_path = out / "report.html"
    atomic_write_text(page_path, page("Red-teaming by activation perturbation", sections))
    return {"csv": str(csv_path), "minimal_eps": str(min_path), "png": str(png), "html": str(page_path)}
