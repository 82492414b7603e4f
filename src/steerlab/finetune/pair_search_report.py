"""The pair-search report: found pairs, the test comparison at equal norm, the token-search trajectory and
the length-vs-strength plot (markdown, HTML and PNGs)."""

from __future__ import annotations

import html
from pathlib import Path

from steerlab.finetune.pair_search import PairSearchResult
from steerlab.finetune.report import markdown_table
from steerlab.io import atomic_write_text, atomic_writer
from steerlab.report.figures import figure_png, new_figure
from steerlab.report.html import page, png_html, table_html

CANDIDATE_COLUMNS = [
    "vector",
    "validation_effect_per_norm",
    "effect_per_norm",
    "ci_low",
    "ci_high",
    "cos_with_handwritten",
    "perplexity",
    "kl",
]
LENGTH_COLUMNS = [
    "length",
    "measured_tokens",
    "n_pairs",
    "effect_per_norm",
    "ci_low",
    "ci_high",
    "mean_vector_effect_per_norm",
    "mean_vector_ci_low",
    "mean_vector_ci_high",
]


def length_figure(rows: list[dict], handwritten: float | None = None):
    """Effect per norm against pair length (log2 axis): single pairs (CI over pairs and prompts) and the
    mean vector of each length's pairs (CI over prompts)."""
    fig, ax = new_figure(figsize=(6, 4))
    x = [r["measured_tokens"] for r in rows]
    for key, label, shift in (("", "single pairs (mean)", 1.0), ("mean_vector_", "mean of the pairs", 1.04)):
        y = [r[f"{key}effect_per_norm"] for r in rows]
        err = [
            [v - r[f"{key}ci_low"] for v, r in zip(y, rows)],
            [r[f"{key}ci_high"] - v for v, r in zip(y, rows)],
        ]
        ax.errorbar([v * shift for v in x], y, yerr=err, marker="o", capsize=3, label=label)
    if handwritten is not None:
        ax.axhline(handwritten, color="grey", ls="--", lw=1, label="hand-written training pairs")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pair length (tokens, measured mean)")
    ax.set_ylabel("test effect per unit norm (95% CI)")
    ax.set_title("length vs strength")
    ax.legend(fontsize=8)
    return fig


def trajectory_figure(greedy: dict, gcg: dict):
    """Validation effect per norm along the greedy selection and the token search."""
    fig, axes = new_figure(figsize=(9, 3.5), ncols=2)
    axes[0].plot(range(1, len(greedy["scores"]) + 1), greedy["scores"], marker="o")
    axes[0].set_xlabel("pairs selected")
    axes[0].set_title("greedy selection")
    axes[1].plot(range(len(gcg["scores"])), gcg["scores"], marker="o")
    axes[1].set_xlabel("token-search step")
    axes[1].set_title("token search")
    for ax in axes:
        ax.set_ylabel("validation effect per norm")
    return fig


def _summary_text(result: PairSearchResult) -> str:
    t = result.test
    return (
        f"Layer {result.layer}, every vector added at norm r = {result.norm:.3g} (both signs). Chosen on "
        f"{t['n_prompts_validation']} validation prompts: `{t['searched']}`. On {t['n_prompts_test']} test "
        f"prompts, effect per norm: hand-written {t['effect_per_norm_handwritten']:.4f}, searched "
        f"{t['effect_per_norm_searched']:.4f}; difference {t['difference']:+.4f} "
        f"[{t['ci_low_difference']:+.4f}, {t['ci_high_difference']:+.4f}] (paired bootstrap over prompts)."
        + (
            f" Unsteered perplexity on neutral text: {t['perplexity_unsteered']:.2f}."
            if "perplexity_unsteered" in t
            else ""
        )
    )


def _pairs_text(result: PairSearchResult) -> list[tuple[str, str]]:
    rows = [(f"greedy {i + 1}", f"{p}  /  {n}") for i, (p, n) in enumerate(result.greedy.get("pairs", []))]
    if result.gcg:
        rows.append(("token search, start", "  /  ".join(result.gcg["start"])))
        rows.append(("token search, found", f"{result.gcg['positive']!r}  /  {result.gcg['negative']!r}"))
    return rows


def write_report(out: Path, result: PairSearchResult) -> None:
    """report.md, report.html, lengths.png and search.png in `out`."""
    hand = result.test["effect_per_norm_handwritten"]
    figures = {"search.png": trajectory_figure(result.greedy, result.gcg)}
    if result.lengths:
        figures["lengths.png"] = length_figure(result.lengths, hand)
    pngs = {name: figure_png(fig) for name, fig in figures.items()}
    for name, png in pngs.items():
        with atomic_writer(out / name) as tmp:
            tmp.write_bytes(png)
    summary = _summary_text(result)
    pairs = _pairs_text(result)
    md = [
        "# Contrast-pair search",
        summary,
        "## Found pairs",
        "\n".join(f"- {label}: {text}" for label, text in pairs),
        "## Vectors (test split unless named)",
        markdown_table(result.candidates, CANDIDATE_COLUMNS),
    ]
    if result.lengths:
        md += ["## Length vs strength (test split)", markdown_table(result.lengths, LENGTH_COLUMNS)]
    atomic_write_text(out / "report.md", "\n\n".join(md) + "\n")
    sections = [
        ("", f"<p>{html.escape(summary)}</p>"),
        ("Found pairs", table_html([{"what": a, "pair": b} for a, b in pairs])),
        ("Vectors", table_html(result.candidates, CANDIDATE_COLUMNS)),
        ("Search", png_html(pngs["search.png"])),
    ]
    if result.lengths:
        sections += [
            ("Length vs strength", png_html(pngs["lengths.png"]) + table_html(result.lengths, LENGTH_COLUMNS))
        ]
    atomic_write_text(out / "report.html", page("Contrast-pair search", sections))
