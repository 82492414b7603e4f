"""The steering report: summary with pass/fail checks, sweep plots, tables and generations."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from steerlab.io import atomic_write_text, atomic_writer
from steerlab.report.html import check, figure_png, page, png_html, table_html
from steerlab.steering import plots
from steerlab.steering.sweep import COLUMNS

METRIC = "p(positive)"
TABLE_COLUMNS = [*COLUMNS, "auroc"]


def summary_checks(summary: dict) -> list[tuple[bool, str]]:
    low, high = summary["test_effect_ci"]
    return [
        (
            summary["test_effect"] >= 0.2 and low > 0,
            f"test effect p(+m) − p(−m) = {summary['test_effect']:.3f}, 95% CI [{low:.3f}, {high:.3f}] (goal ≥ 0.2, CI excluding 0)",
        ),
        (summary["test_monotone"], "test score monotone from −m to +m"),
        (
            summary["added_norm_over_residual"] <= 0.2,
            f"‖m·v‖ = {100 * summary['added_norm_over_residual']:.1f}% of the residual norm (goal ≤ 20%)",
        ),
        (
            summary["random_control_max_shift"] < 0.05,
            f"random vector of the same norm moves the score by {summary['random_control_max_shift']:.3f} (goal < 0.05)",
        ),
        (
            summary["perplexity_rise"] <= 0.2,
            f"perplexity on neutral text rises by {100 * summary['perplexity_rise']:.1f}% (goal ≤ 20%)",
        ),
    ]


def terminal_summary(summary: dict, out_dir: str | Path) -> str:
    lines = [
        f"steerlab demo — {summary['model']}, {summary['behaviour']}",
        f"chosen on validation: layer {summary['layer']}, multiplier ±{summary['multiplier']:.2f} "
        f"(‖m·v‖ = {summary['fraction_of_residual_norm']:.0%} of residual norm {summary['residual_norm']:.0f})",
        f"test: p(positive) −m {summary['test_p_minus']:.3f} | unsteered {summary['test_p_base']:.3f} | +m {summary['test_p_plus']:.3f}",
    ]
    for ok, text in summary_checks(summary):
        lines.append(f"  {'PASS' if ok else 'FAIL'}  {text}")
    lines.append(
        f"separability AUROC at layer {summary['layer']}: {summary['auroc']:.3f}; "
        f"KL(+m) {summary['kl_plus']:.3f}, KL(−m) {summary['kl_minus']:.3f} nats"
    )
    lines.append(f"report: {Path(out_dir) / 'report.html'}   ({summary['seconds']:.0f} s)")
    return "\n".join(lines)


def _generations_html(generations: Sequence[dict]) -> str:
    rows = [
        {
            "prompt": g["prompt"],
            "steered −m": g["minus"],
            "unsteered": g["unsteered"],
            "steered +m": g["plus"],
        }
        for g in generations
    ]
    return table_html(rows, css_class="gen")


def demo_report(
    out_dir: str | Path, summary: dict, rows: Sequence[dict], generations: Sequence[dict], metadata: dict
) -> Path:
    out = Path(out_dir)
    checks = "<ul>" + "".join(f"<li>{check(ok, text)}</li>" for ok, text in summary_checks(summary)) + "</ul>"
    overview = (
        f"<p>Model <code>{html.escape(summary['model'])}</code>; behaviour: {html.escape(summary['behaviour'])}. "
        f"Vector: mean difference of the last-token residual stream over {summary['n_pairs_train']} sentence pairs. "
        f"Layer and multiplier chosen on {summary['n_prompts_validation']} validation prompts, reported on "
        f"{summary['n_prompts_test']} separate test prompts: layer {summary['layer']}, multiplier "
        f"±{summary['multiplier']:.3f}.</p>" + checks
    )
    test_rows = [r for r in rows if r["split"] == "test"]
    val_rows = [r for r in rows if r["split"] == "validation"]
    figures = {
        "test_curve": plots.score_vs_fraction(rows, "test", METRIC),
        "sweep": plots.score_vs_fraction(rows, "validation", METRIC),
        "layers": plots.score_vs_layer(rows, "validation", METRIC),
        "side_effects": plots.side_effect_plot(rows, "validation"),
    }
    images = {}
    for name, fig in figures.items():
        images[name] = figure_png(fig)
        with atomic_writer(out / f"plot_{name}.png") as tmp:
            tmp.write_bytes(images[name])
    sections = [
        ("", overview),
        (
            "Test split at the chosen layer",
            png_html(images["test_curve"], "steering vs random control vs unsteered")
            + table_html(test_rows, TABLE_COLUMNS),
        ),
        (
            "Validation sweep: layers × multipliers",
            png_html(images["sweep"]) + png_html(images["layers"]) + png_html(images["side_effects"]),
        ),
        ("Generations (greedy), steered and unsteered", _generations_html(generations)),
        ("Validation grid", table_html(val_rows, TABLE_COLUMNS)),
        ("Vector metadata", f"<pre>{html.escape(json.dumps(metadata, indent=2))}</pre>"),
    ]
    path = out / "report.html"
    atomic_write_text(path, page("steerlab steering report", sections))
    return path
