"""The distillation report: a bar plot of KL(prompted || student) per method with CIs, the table, and
generations side by side (prompted, unprompted, each injection), as report.md and report.html."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from steerlab.io import atomic_write_text
from steerlab.report.figures import figure_png, new_figure, save_png
from steerlab.report.html import page, png_html, table_html

COLUMNS = (
    "method", "kl", "kl_low", "kl_high", "removed", "removed_low", "removed_high", "norm", "params", "steps",
    "seconds",
)  # fmt: skip


def kl_figure(rows: Sequence[dict], title: str = "distilling a system prompt"):
    """Bars: mean test KL(prompted || student) per method with its bootstrap 95% CI."""
    fig, ax = new_figure(figsize=(max(5.0, 0.7 * len(rows) + 2), 4))
    errors = [[r["kl"] - r["kl_low"] for r in rows], [r["kl_high"] - r["kl"] for r in rows]]
    colours = ["tab:grey" if r["method"] == "unprompted" else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r["kl"] for r in rows], yerr=errors, capsize=3, color=colours)
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test KL(prompted || student), nats/token (95% CI)")
    ax.set_title(title)
    return fig


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _generations_html(generations: Sequence[dict]) -> str:
    if not generations:
        return "<p>(none)</p>"
    columns = list(generations[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(g[c]))}</td>" for c in columns) + "</tr>" for g in generations
    )
    return f'<table class="gen"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def write_distill_report(out: Path, rows: Sequence[dict], summary: dict, generations: Sequence[dict]) -> None:
    """report.md, report.html and kl.png in `out`."""
    fig = kl_figure(rows)
    save_png(fig, out / "kl.png")
    budget = (
        f"System prompt {summary['system_prompt']} ({summary['tokens_saved_per_call']:.0f} tokens saved per "
        f"call). Teacher replies of at most {summary['reply_tokens']} tokens; {summary['n_train']} training "
        f"and {summary['n_test']} held-out test user prompts. Budget per trained method: {summary['steps']} "
        f"Adam steps of {summary['batch_size']} prompts (lr {summary['lr']}, LoRA lr {summary['lora_lr']}, "
        f"rank {summary['rank']}, seed {summary['seed']}). 'removed' = 1 - KL(method) / KL(unprompted) "
        "on the test prompts, bootstrap 95% CI over prompts."
    )
    atomic_write_text(out / "report.md", f"# {summary['title']}\n\n{budget}\n\n{markdown_table(rows)}")
    html_page = page(
        summary["title"],
        [
            ("", f"<p>{html.escape(budget)}</p>"),
            ("System prompt", f"<pre>{html.escape(summary['system_prompt_text'])}</pre>"),
            ("Test KL", png_html(figure_png(fig))),
            ("Table", table_html(rows, COLUMNS)),
            ("Generations side by side (greedy)", _generations_html(generations)),
        ],
    )
    atomic_write_text(out / "report.html", html_page)
