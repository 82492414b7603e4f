"""`steerlab influence fit|score|report` end to end on a tiny saved model: a self-contained HTML report."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.influence.cli import add_subcommands, parse_layers


def _main(argv):
    parser = argparse.ArgumentParser(prog="steerlab")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_parse_layers():
    assert parse_layers("24-29") == [24, 25, 26, 27, 28, 29]
    assert parse_layers("0,3,-1") == [0, 3, -1]
    assert parse_layers(None) is None


def test_fit_score_report(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    text = "".join(
        f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog.\n" for i in range(40)
    )
    (tmp_path / "train.txt").write_text(text)
    copied = text[48:96]
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"prompt": copied[:24], "completion": copied[24:]})
        + "\n"
        + json.dumps({"prompt": "the lazy ", "completion": "dog jumps"})
        + "\n"
    )
    run = tmp_path / "run"
    common = ["--run", str(run)]
    fit = ["influence", "fit", *common, "--model", str(model_dir), "--train", str(tmp_path / "train.txt")]
    fit += ["--block-size", "24", "--n-blocks", "12", "--batch-size", "6"]
    _main([*fit, "--layers", "2-3"])
    _main(["influence", "score", *common, "--queries", str(tmp_path / "q.jsonl"), "--top-k", "4"])
    scores = json.loads((run / "scores" / "args.json").read_text())
    assert scores["top_k"] == 4
    _main(
        [
            "influence",
            "score",
            *common,
            "--queries",
            str(tmp_path / "q.jsonl"),
            "--prefilter",
            "6",
            "--name",
            "tfidf",
        ]
    )
    recall = json.loads((run / "tfidf" / "recall.json").read_text())["recall_of_unfiltered_top10"]
    assert 0 <= recall <= 1
    _main(["influence", "self", *common, "--top-k", "3"])
    top = json.loads((run / "self" / "top.json").read_text())
    assert (
        len(top) == 3 and top[0]["self_influence"] >= top[1]["self_influence"] >= top[2]["self_influence"] > 0
    )
    _main(["influence", "report", *common, "--show", "2", "--png"])
    assert (run / "report-query1.png").stat().st_size > 1000
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # 2 figures x 2 queries
    assert not re.search(r"(src|href)=['\"]?https?:", html)  # self-contained
    assert "Most negative" in html and "training #" in html
    # changing fit arguments on the same run directory is refused
    with pytest.raises(SystemExit, match="other settings"):
        _main([*fit, "--layers", "1-3"])
