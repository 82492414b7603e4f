"""The comparison report: a markdown table, an HTML page and a bar plot of the test effects with CIs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
    """report.md, report.html and effects.png in `out`."""
    fig = effects_figure(rows)
    save_png(fig, out / "effects.png")
    budget = (
        f"Budget per trained method: {summary['steps']} Adam steps of {summary['batch_size']} pairs "
        f"(lr {summary['lr']}, loss: {summary['loss']}, seed {summary['seed']}). "
        f"Behaviour: {summary['behaviour']}; {summary['n_pairs_train']} training pairs, "
        f"{summary['n_prompts_test']} test prompts."
    )
    atomic_write_text(out / "report.md", f"# {summary['title']}\n\n{budget}\n\n{markdown_table(rows)}")
    html = page(
        summary["title"],
        [
            ("", f"<p>{budget}</p>"),
            ("Test effects", png_html(figure_png(fig))),
            ("Table", table_html(rows, COLUMNS)),
        ],
    )
    atomic_write_text(out / "report.html", html)
