"""Per-token, per-layer explanations of the most influential sequences, and a self-contained HTML report.

Per-token score of training token t: ds_t^T P_q a_t summed over tracked modules (the module input at
position t and the loss gradient flowing into that position); the per-token scores of a sequence sum to
its score. The report shows them as a heat-map (red: raises the completion's log-probability, blue:
lowers it), like Grosse et al.'s figures. The page is built with `steerlab.report.html` (inline CSS,
figures as base64 PNG data URIs): the file needs nothing else.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch
from torch import nn

from steerlab.influence.pass_cache import run_batch
from steerlab.influence.scores import Preconditioned, per_layer, score_captured
from steerlab.influence.tasks import Task

__all__ = ["explain", "layer_share", "render_html", "render_png"]


def explain(
    model: nn.Module,
    task: Task,
    train,
    pre: Preconditioned,
    query: int,
    indices: Sequence[int],
) -> list[dict]:
    """Per-token and per-layer scores of query `query` on training examples `indices` (a source with
    `with_subset`, e.g. `BlockBatches`). Returns one dict per example: index, score, tokens, layers."""
    one = Preconditioned(
        {k: v[query : query + 1] for k, v in pre.full.items()},
        {k: v[query : query + 1] for k, v in pre.left.items()},
        {k: v[query : query + 1] for k, v in pre.right.items()},
    )
    modules = {n: m for n, m in task.modules(model).items() if n in one.modules}
    source = train.with_subset(list(indices))
    out = []
    for i in range(len(source)):
        batch = source[i]
        cap = run_batch(model, task, modules, batch)
        seq, tok = score_captured(cap, one, per_token=True)
        mask = task.token_mask(batch)
        for b, idx in enumerate(source.indices(i).tolist()):
            n_tok = int(mask[b].sum()) if mask is not None else tok[next(iter(tok))].shape[-1]
            layers = per_layer({n: s[0, b] for n, s in seq.items()}, model)
            out.append(
                {
                    "index": idx,
                    "score": float(sum(s[0, b] for s in seq.values())),
                    "token_scores": [float(v) for v in sum(tok.values())[0, b, :n_tok]],
                    "layers": {str(k): float(v) for k, v in layers.items()},
                }
            )
    return out


def _figures(query: dict) -> str:
    from steerlab.report.figures import new_figure
    from steerlab.report.html import figure_html

    fig, ax = new_figure((4.2, 2.4))
    layers = query["layer_share"]
    ax.bar([str(k) for k in layers], list(layers.values()), color="#4c72b0")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of |score|")
    ax.set_title("layer-wise distribution (all training)", fontsize=9)
    layer_fig = figure_html(fig)
    fig, ax = new_figure((4.2, 2.4))
    ax.hist(query["sample_scores"], bins=40, color="#55a868")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    ax.set_xlabel("influence score")
    ax.set_ylabel("training sequences")
    ax.set_title("score histogram", fontsize=9)
    return f"<div class='figs'>{layer_fig}{figure_html(fig)}</div>"


def _heat(tokens: Sequence[str], scores: Sequence[float]) -> str:
    scale = max((abs(s) for s in scores), default=1.0) or 1.0
    spans = []
    for tok, s in zip(tokens, scores):
        alpha = min(1.0, abs(s) / scale)
        color = f"rgba(214,39,40,{alpha:.2f})" if s > 0 else f"rgba(31,119,180,{alpha:.2f})"
        spans.append(f'<span style="background:{color}" title="{s:.4g}">{html.escape(tok)}</span>')
    return "".join(spans)


HEATMAP_CSS = """
.seq{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:12px;line-height:1.6;
 border:1px solid #ddd;padding:.5em;border-radius:4px;margin:.3em 0 1em}
.query{background:#f6f6f6}.meta{color:#666;font-size:12px}
.figs{display:flex;gap:1em}.cols{display:flex;gap:2em}.cols>div{flex:1;min-width:0}
"""


def _query_section(q: dict) -> str:
    parts = [
        f"<div class='seq query'><b>{html.escape(q['prompt'])}</b><u>{html.escape(q['completion'])}</u></div>",
        _figures(q),
        "<div class='cols'>",
    ]
    for label, key in (("Most positive", "positive"), ("Most negative", "negative")):
        parts.append(f"<div><h3>{label}</h3>")
        for ex in q[key]:
            layers = ", ".join(f"L{k}: {v:.3g}" for k, v in ex["layers"].items())
            parts.append(
                f"<div class='meta'>training #{ex['index']} &middot; score {ex['score']:.4g} &middot; {layers}</div>"
                f"<div class='seq'>{_heat(ex['tokens'], ex['token_scores'])}</div>"
            )
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def render_html(title: str, meta: dict, queries: list[dict]) -> str:
    """queries: dicts with prompt, completion, positive/negative (lists of explained examples, each with
    `tokens` strings), layer_share {layer: share}, sample_scores (list)."""
    from steerlab.report.html import page

    intro = (
        "<p class='meta'>"
        + " &middot; ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in meta.items())
        + "</p><p>Score &gt; 0 (red): training on the sequence raises the completion's log-probability; "
        "&lt; 0 (blue): lowers it. Token colours: per-token contributions, which sum to the sequence's "
        "score (hover for values).</p>"
    )
    sections = [("", intro)] + [(f"Query {i}", _query_section(q)) for i, q in enumerate(queries)]
    return page(title, sections, extra_css=HEATMAP_CSS)


def layer_share(layer_abs: torch.Tensor, layers: Sequence[int]) -> list[dict[int, float]]:
    """Per query, each layer's share of the summed |per-layer score| over the scored training set."""
    share = layer_abs / layer_abs.sum(1, keepdim=True).clamp_min(1e-300)
    return [{int(layer): float(v) for layer, v in zip(layers, row)} for row in share]


def _wrap_tokens(tokens: Sequence[str], scores: Sequence[float], width: int) -> list[list[tuple[str, float]]]:
    lines: list[list[tuple[str, float]]] = [[]]
    used = 0
    for tok, s in zip(tokens, scores):
        tok = tok.replace("\n", "⏎")
        if used + len(tok) > width and lines[-1]:
            lines.append([])
            used = 0
        lines[-1].append((tok, s))
        used += len(tok)
    return lines


def render_png(query: dict, path, show: int = 2, width: int = 100, max_lines: int = 5) -> None:
    """A static picture of one query's report section (for docs), written atomically: the query, then the
    most positive and most negative training sequences as per-token heat-maps (monospace, a few lines
    each). Text is drawn as is (a `$` in a query is no mathtext)."""
    from matplotlib.patches import Rectangle

    from steerlab.report.figures import new_figure, plain_text, save_png

    rows: list[tuple[str, object]] = [("title", f"Query: {query['prompt']!r} -> {query['completion']!r}")]
    for label, key in (("most positive", "positive"), ("most negative", "negative")):
        for ex in query[key][:show]:
            rows.append(("title", f"{label}: training #{ex['index']}  score {ex['score']:.3g}"))
            lines = _wrap_tokens(ex["tokens"], ex["token_scores"], width)[:max_lines]
            scale = max((abs(v) for v in ex["token_scores"]), default=1.0) or 1.0
            rows.extend(("tokens", (line, scale)) for line in lines)
    char_in, line_h = 7.5 * 0.6 / 72, 1.0  # monospace advance of a 7.5 pt font, in inches
    fig, ax = new_figure((width * char_in, 0.2 * len(rows) + 0.3))
    ax.set_position([0, 0, 1, 1])
    ax.set_xlim(0, width)
    ax.set_ylim(len(rows) * line_h + 0.3, 0)
    ax.axis("off")
    for r, (kind, content) in enumerate(rows):
        y = r * line_h + 0.6
        if kind == "title":
            ax.text(
                0,
                y,
                plain_text(str(content)[: width + 20]),
                fontsize=8,
                fontweight="bold",
                va="center",
                family="monospace",
            )
            continue
        line, scale = content
        x = 0.0
        for tok, s in line:
            alpha = min(1.0, abs(s) / scale)
            color = (0.84, 0.15, 0.16, alpha) if s > 0 else (0.12, 0.47, 0.71, alpha)
            ax.add_patch(Rectangle((x, y - 0.45), len(tok), 0.9, color=color, lw=0))
            ax.text(x, y, plain_text(tok), fontsize=7.5, va="center", family="monospace")
            x += len(tok)
    save_png(fig, path)
