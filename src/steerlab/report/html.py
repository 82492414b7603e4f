"""Self-contained HTML pages: inline CSS, figures embedded as base64 PNG, no external resources."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from steerlab.report.figures import figure_png

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37;font-weight:600} .bad{color:#b42318;font-weight:600}
figure{margin:1em 0} figcaption{font-size:.85em;color:#555} img{max-width:100%}
.gen td{max-width:330px} code{background:#f5f5f5;padding:0 .2em}
"""


def png_html(png: bytes, caption: str = "") -> str:
    """Embed PNG bytes as a data URI."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">{cap}</figure>'


def figure_html(fig, caption: str = "") -> str:
    """Embed a matplotlib figure as a PNG data URI and close it."""
    return png_html(figure_png(fig), caption)


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def table_html(rows: Sequence[dict], columns: Sequence[str] | None = None, css_class: str = "") -> str:
    if not rows:
        return "<p>(no rows)</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def page(title: str, sections: Sequence[tuple[str, str]], extra_css: str = "") -> str:
    """A complete HTML document; `sections` are (heading, inner html) pairs."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" if h else body for h, body in sections]
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}{extra_css}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def check(ok: bool, text: str) -> str:
    return f'<span class="{"ok" if ok else "bad"}">{"✔" if ok else "✘"} {html.escape(text)}</span>'
