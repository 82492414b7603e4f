"""The influence report's pictures: user text is drawn as is, PNGs are written whole."""

from __future__ import annotations

import pytest

from steerlab.influence.report import render_html, render_png
from steerlab.report.figures import figure_png, new_figure, plain_text

# `$x^{$` is broken mathtext, `\` a bare backslash, `\$` an escaped dollar: all must be drawn literally
TEXTS = ["price $x$ and \\ here", "cost $x^{$", "a\\$b", "$\\frac$"]


def _query(text: str) -> dict:
    example = {
        "index": 3,
        "score": 0.5,
        "tokens": ["The", " $x$", " \\", " end"],
        "token_scores": [1, -2, 0.5, 0],
        "layers": {"0": 0.2, "1": 0.3},
    }
    return {
        "prompt": text,
        "completion": " $y$",
        "positive": [example],
        "negative": [{**example, "score": -0.5}],
        "layer_share": {0: 0.25, 1: 0.75},
        "sample_scores": [0.1, -0.2, 0.3],
    }


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_is_drawn_literally(text):
    fig, ax = new_figure((3, 1))
    label = ax.text(0, 0.5, plain_text(text))
    assert figure_png(fig).startswith(b"\x89PNG")
    assert label._preprocess_math(label.get_text()) == (text, False)  # what matplotlib draws


def test_png_of_a_query_with_dollars_and_backslashes(tmp_path):
    out = tmp_path / "q.png"
    render_png(_query("What is $x$ in C:\\temp, at $5 or $x^{$?"), out)  # broke mathtext before
    assert out.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir()] == ["q.png"]  # no temporary file left


def test_html_report_renders_the_query():
    page = render_html("report", {"model": "tiny"}, [_query("What is $x$?")])
    assert "What is $x$?" in page and "<img" in page
