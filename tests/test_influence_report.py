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


def test_explain_splits_each_score_into_tokens_and_layers():
    import torch

    from conftest import micro_llama
    from steerlab.influence import (
        LanguageModelTask,
        fit_factors,
        pairwise_scores,
        preconditioned_queries,
        query_gradients,
    )
    from steerlab.influence.data import query_batch
    from steerlab.influence.pipeline import BlockBatches
    from steerlab.influence.report import explain

    model, task = micro_llama(), LanguageModelTask()
    blocks = torch.randint(3, 64, (8, 10), generator=torch.Generator().manual_seed(0))
    train = BlockBatches(blocks, 4)
    queries = [query_batch([blocks[2, :5].tolist()], [blocks[2, 5:].tolist()])]
    pre = preconditioned_queries(query_gradients(model, task, queries), fit_factors(model, task, list(train)))
    scores = pairwise_scores(model, task, list(train), pre)["scores"][0]
    explained = explain(model, task, train, pre, 0, [2, 6])
    assert [ex["index"] for ex in explained] == [2, 6]
    for ex in explained:
        assert ex["score"] == pytest.approx(float(scores[ex["index"]]), rel=1e-9)
        assert sum(ex["token_scores"]) == pytest.approx(ex["score"], rel=1e-9)
        assert set(ex["layers"]) == {"0", "1"}
        assert sum(ex["layers"].values()) == pytest.approx(ex["score"], rel=1e-9)
