"""The comparison report: markdown tables (every row, and the seeds of each method aggregated), an HTML
page, and plots: the test effects with CIs, effect against layer per method, effect against perplexity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from steerlab.finetune.compare import COLUMNS
from steerlab.io import atomic_write_text
from steerlab.report.figures import figure_png, new_figure, save_png
from steerlab.report.html import page, png_html, table_html


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    """The rows as a markdown table (missing fields left blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


SUMMARY_COLUMNS = [
    "layer",
    "method",
    "seeds",
    "effect",
    "effect_spread",
    "ci_low",
    "ci_high",
    "kl",
    "perplexity",
    "capability",
    "control",
    "added_norm",
    "trainable_params",
    "train_seconds",
    "steps",
    "tokens",
    "cos_with_caa",
    "cos_spread",
]


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One row per (layer, method): means over seeds, `effect_spread` and `cos_spread` = half the range over
    seeds (0 for one seed), and [ci_low, ci_high] = the union of the seeds' 95% CIs."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["layer"], row["method"]), []).append(row)
    out = []
    for (layer, method), members in groups.items():
        merged: dict = {"layer": layer, "method": method, "seeds": len(members)}
        for key in ("effect", "kl", "perplexity", "capability", "control", "added_norm", "trainable_params",
                    "train_seconds", "steps", "tokens", "cos_with_caa"):  # fmt: skip
            values = [r[key] for r in members if r.get(key) is not None]
            merged[key] = float(np.mean(values)) if values else None
        for key, spread in (("effect", "effect_spread"), ("cos_with_caa", "cos_spread")):
            values = [r[key] for r in members if r.get(key) is not None]
            merged[spread] = (max(values) - min(values)) / 2 if values else None
        merged["ci_low"] = min(r["ci_low"] for r in members)
        merged["ci_high"] = max(r["ci_high"] for r in members)
        out.append(merged)
    return out


def layers_figure(summary_rows: Sequence[dict]):
    """Effect against layer, one line per method (error bars: half the range over seeds)."""
    fig, ax = new_figure(figsize=(6, 4))
    methods = list(dict.fromkeys(r["method"] for r in summary_rows if r["method"] != "unsteered"))
    for method in methods:
        shown = sorted((r for r in summary_rows if r["method"] == method), key=lambda r: r["layer"])
        ax.errorbar(
            [r["layer"] for r in shown],
            [r["effect"] for r in shown],
            yerr=[r["effect_spread"] for r in shown],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("test shift of the behaviour score")
    ax.set_title("effect by layer (mean over seeds; bars: half range)")
    ax.legend(fontsize=8)
    return fig


def tradeoff_figure(summary_rows: Sequence[dict]):
    """Effect against perplexity on neutral text, one marker per (layer, method); the unsteered level dashed."""
    fig, ax = new_figure(figsize=(6, 4))
    methods = list(dict.fromkeys(r["method"] for r in summary_rows if r["method"] != "unsteered"))
    for method in methods:
        shown = [r for r in summary_rows if r["method"] == method]
        ax.scatter([r["perplexity"] for r in shown], [r["effect"] for r in shown], label=method)
        for r in shown:
            ax.annotate(f"L{r['layer']}", (r["perplexity"], r["effect"]), fontsize=7)
    base = [r["perplexity"] for r in summary_rows if r["method"] == "unsteered"]
    if base:
        ax.axvline(base[0], color="grey", ls="--", lw=1, label="unsteered perplexity")
    ax.axhline(0, color="grey", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity on neutral text (log scale)")
    ax.set_ylabel("test shift of the behaviour score")
    ax.set_title("effect against side effect")
    ax.legend(fontsize=8)
    return fig


def effects_figure(rows: Sequence[dict]):
    """Bars: the test shift of each method at each layer, with its bootstrap 95% CI."""
    shown = [r for r in rows if r["method"] != "unsteered"]
    fig, ax = new_figure(figsize=(max(5.0, 0.6 * len(shown) + 2), 4))
    labels = [f"L{r['layer']} {r['method']}" for r in shown]
    effects = [r["effect"] for r in shown]
    errors = [[r["effect"] - r["ci_low"] for r in shown], [r["ci_high"] - r["effect"] for r in shown]]
    ax.bar(range(len(shown)), effects, yerr=errors, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(shown)), labels, rotation=45, ha="right", fontsize=8)
    ax.axhline(0, color="grey", lw=1)
    ax.set_ylabel("test shift of the behaviour score (95% CI)")
    ax.set_title("steering vs trained interventions")
    return fig


def write_report(out: Path, rows: Sequence[dict], summary: dict) -> None:
    """report.md, report.html, effects.png, layers.png and tradeoff.png in `out`."""
    merged = aggregate(rows)
    figures = {
        "effects": effects_figure(rows),
        "layers": layers_figure(merged),
        "tradeoff": tradeoff_figure(merged),
    }
    for name, fig in figures.items():
        save_png(fig, out / f"{name}.png")
    seeds = summary.get("seeds") or [summary["seed"]]
    budget = (
        f"Budget per trained method: {summary['steps']} Adam steps of {summary['batch_size']} items "
        f"(lr {summary['lr']}, loss: {summary['loss']}, seeds {', '.join(map(str, seeds))}). "
        f"Behaviour: {summary['behaviour']}; {summary['n_pairs_train']} training items, "
        f"{summary['n_prompts_test']} test items."
    )
    if summary.get("capability"):
        budget += f" Capability: accuracy on {summary['capability_limit']} {summary['capability']} items."
    tables = f"## Mean over seeds\n\n{markdown_table(merged, SUMMARY_COLUMNS)}\n## Every run\n\n{markdown_table(rows)}"
    atomic_write_text(out / "report.md", f"# {summary['title']}\n\n{budget}\n\n{tables}")
    html = page(
        summary["title"],
        [
            ("", f"<p>{budget}</p>"),
            ("Test effects", png_html(figure_png(figures["effects"]))),
            ("Effect by layer", png_html(figure_png(figures["layers"]))),
            ("Effect against perplexity", png_html(figure_png(figures["tradeoff"]))),
            ("Mean over seeds", table_html(merged, SUMMARY_COLUMNS)),
            ("Every run", table_html(rows, COLUMNS)),
        ],
    )
    atomic_write_text(out / "report.html", html)
