"""`steerlab influence fit|score|self|report` end to end on a tiny saved model, and its errors: one line,
exit status 2, nothing written that would refuse the corrected command."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.cli import main
from steerlab.errors import UserError
from steerlab.influence.config import FitArgs, ScoreArgs
from steerlab.io import load_tensors
from steerlab.options import add_arguments

TEXT = "".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog.\n" for i in range(40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", dtype=torch.float32).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return path


def _queries(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _fit(run, model_dir, train, *extra) -> list[str]:
    return ["influence", "fit", "--run", str(run), "--model", str(model_dir), "--train", str(train),
            "--block-size", "24", "--n-blocks", "12", "--batch-size", "6", "--layers", "2-3", *extra]  # fmt: skip


def _fails(capsys, argv: list[str]) -> str:
    """The one-line error of a command that must exit with status 2."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("steerlab: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_fit_score_self_report(tmp_path, model_dir, corpus):
    copied = TEXT[48:96]
    q = _queries(
        tmp_path / "q.jsonl",
        [
            {"prompt": copied[:24], "completion": copied[24:]},
            {"prompt": "the lazy ", "completion": "dog jumps"},
        ],
    )
    run = tmp_path / "run"
    assert main(_fit(run, model_dir, corpus)) == 0
    config = json.loads((run / "config.json").read_text())
    assert config == FitArgs(**{**config, "checkpoint_every": 8}).saved()
    assert config["layers"] == [2, 3] and config["train"] == str(corpus.resolve())
    assert main(["influence", "score", "--run", str(run), "--queries", q, "--top-k", "4"]) == 0
    assert json.loads((run / "scores" / "args.json").read_text())["top_k"] == 4
    tfidf = ["influence", "score", "--run", str(run), "--queries", q, "--prefilter", "6", "--name", "tfidf"]
    assert main(tfidf) == 0
    recall = json.loads((run / "tfidf" / "recall.json").read_text())["recall_of_unfiltered_top10"]
    assert 0 <= recall <= 1
    assert main(["influence", "self", "--run", str(run), "--top-k", "3"]) == 0
    top = json.loads((run / "self" / "top.json").read_text())
    assert (
        len(top) == 3 and top[0]["self_influence"] >= top[1]["self_influence"] >= top[2]["self_influence"] > 0
    )
    assert main(["influence", "report", "--run", str(run), "--show", "2", "--png"]) == 0
    assert (run / "report-query1.png").stat().st_size > 1000
    assert main(["influence", "report", "--run", str(run), "--show", "1"]) == 0  # other --show: recomputed
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # 2 figures x 2 queries
    assert not re.search(r"(src|href)=['\"]?https?:", html)  # self-contained
    assert "Most negative" in html and "training #" in html
    assert not list(run.rglob("*.tmp"))


def test_argparse_defaults_come_from_the_dataclasses():
    for cls in (FitArgs, ScoreArgs):
        parser = argparse.ArgumentParser()
        add_arguments(parser, cls)
        required = {"train": "c.txt"} if cls is FitArgs else {"queries": "q.jsonl"}
        flags = [x for k, v in required.items() for x in (f"--{k}", v)]
        parsed = vars(parser.parse_args(flags))
        assert parsed == {f.name: required.get(f.name, f.default) for f in fields(cls)}


@pytest.mark.parametrize("quiet", [False, True])
def test_influence_commands_honour_quiet(monkeypatch, tmp_path, corpus, quiet):
    """-q used to leave the progress bars of fit, score and self on."""
    import steerlab.influence.commands as commands

    seen = {}

    def stage(name):
        def run(run_dir, args, progress):
            seen[name] = progress
            raise UserError("stopped")

        return run

    for name in ("fit_run", "score_run", "self_run"):
        monkeypatch.setattr(commands, name, stage(name))
    queries = _queries(tmp_path / "q.jsonl", [{"prompt": "a", "completion": "b"}])
    run = str(tmp_path / "run")
    flags = ["-q"] if quiet else []
    for command in (["fit", "--train", str(corpus)], ["score", "--queries", queries], ["self"]):
        assert main([*flags, "influence", command[0], "--run", run, *command[1:]]) == 2
    assert seen == dict.fromkeys(("fit_run", "score_run", "self_run"), not quiet)


def test_fit_missing_corpus_writes_nothing(tmp_path, model_dir, corpus, capsys):
    run = tmp_path / "run"
    err = _fails(capsys, _fit(run, model_dir, tmp_path / "missing.txt"))
    assert "--train" in err and "missing.txt" in err
    assert not (run / "config.json").exists()
    assert main(_fit(run, model_dir, corpus)) == 0  # the corrected command runs


def test_fit_non_utf8_corpus_names_line_and_byte(tmp_path, model_dir, corpus, capsys):
    bad = tmp_path / "bad.txt"
    data = TEXT.encode()
    cut = data.index(b"\n", data.index(b"\n") + 1) + 5  # in line 3
    bad.write_bytes(data[:cut] + b"\xff" + data[cut:])
    run = tmp_path / "run"
    err = _fails(capsys, _fit(run, model_dir, bad))
    assert "bad.txt" in err and "line 3" in err and f"byte offset {cut}" in err
    assert not (run / "config.json").exists() and not (run / "tokens").exists()
    assert main(_fit(run, model_dir, corpus)) == 0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--n-blocks", "0"),
        ("--block-size", "1"),
        ("--batch-size", "0"),
        ("--layers", "2-x"),
        ("--samples", "0"),
        ("--block-max-params", "0"),
        ("--unit-max-params", "0"),
    ],
)
def test_fit_bad_option_is_one_line(tmp_path, model_dir, corpus, capsys, option, value):
    assert option in _fails(capsys, [*_fit(tmp_path / "run", model_dir, corpus), option, value])
    assert not (tmp_path / "run").exists()


def test_refit_with_other_settings_names_the_keys(tmp_path, model_dir, corpus, capsys):
    run = tmp_path / "run"
    assert main(_fit(run, model_dir, corpus)) == 0
    err = _fails(capsys, [*_fit(run, model_dir, corpus), "--layers", "1-3", "--seed", "3"])
    assert "layers: saved [2, 3] != requested [1, 2, 3]" in err and "seed: saved 0 != requested 3" in err


def test_run_survives_a_moved_corpus(tmp_path, model_dir, corpus):
    run = tmp_path / "run"
    assert main(_fit(run, model_dir, corpus)) == 0
    moved = tmp_path / "elsewhere.txt"
    shutil.move(corpus, moved)
    q = _queries(tmp_path / "q.jsonl", [{"prompt": "the lazy ", "completion": "dog jumps"}])
    assert main(["influence", "score", "--run", str(run), "--queries", q, "--top-k", "2"]) == 0
    assert main(["influence", "self", "--run", str(run), "--top-k", "2"]) == 0
    assert main(_fit(run, model_dir, moved)) == 0  # same bytes at a new path: the run resumes
    assert json.loads((run / "config.json").read_text())["train"] == str(moved.resolve())


def test_new_queries_point_to_another_name(tmp_path, model_dir, corpus, capsys):
    run = tmp_path / "run"
    assert main(_fit(run, model_dir, corpus)) == 0
    q1 = _queries(tmp_path / "q1.jsonl", [{"prompt": "the lazy ", "completion": "dog jumps"}])
    q2 = _queries(tmp_path / "q2.jsonl", [{"prompt": "the quick ", "completion": "brown fox"}])
    assert main(["influence", "score", "--run", str(run), "--queries", q1, "--top-k", "2"]) == 0
    assert "--name" in _fails(
        capsys, ["influence", "score", "--run", str(run), "--queries", q2, "--top-k", "2"]
    )
    assert (
        main(["influence", "score", "--run", str(run), "--queries", q2, "--top-k", "2", "--name", "q2"]) == 0
    )


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "the lazy ", "completion": ""}, "completion"),
        ({"prompt": "", "completion": "dog"}, "prompt"),
        ({"prompt_ids": [5, 6], "completion_ids": []}, "completion_ids"),
    ],
)
def test_empty_query_is_refused(tmp_path, model_dir, corpus, capsys, row, field):
    run = tmp_path / "run"
    assert main(_fit(run, model_dir, corpus)) == 0
    q = _queries(tmp_path / "q.jsonl", [{"prompt": "the lazy ", "completion": "dog jumps"}, row])
    err = _fails(capsys, ["influence", "score", "--run", str(run), "--queries", q])
    assert "q.jsonl" in err and "line 2" in err and f"field {field!r}" in err
    assert not (run / "scores").exists()


def test_score_before_fit_is_one_line(tmp_path, capsys):
    q = _queries(tmp_path / "q.jsonl", [{"prompt": "a", "completion": "b"}])
    assert "influence fit" in _fails(
        capsys, ["influence", "score", "--run", str(tmp_path / "none"), "--queries", q]
    )


def test_report_overwrite_is_atomic(tmp_path, model_dir, corpus, monkeypatch):
    """A write that fails half-way (disk full) keeps the previous complete report and pictures."""
    run = tmp_path / "run"
    assert main(_fit(run, model_dir, corpus)) == 0
    q = _queries(tmp_path / "q.jsonl", [{"prompt": "the lazy ", "completion": "dog jumps"}])
    assert main(["influence", "score", "--run", str(run), "--queries", q, "--top-k", "2"]) == 0
    assert main(["influence", "report", "--run", str(run), "--show", "1", "--png"]) == 0
    html, png = (run / "report.html").read_bytes(), (run / "report-query0.png").read_bytes()

    write_text, write_bytes = Path.write_text, Path.write_bytes

    def half_then_fail(self, data, *args, **kwargs):
        if not (data.startswith(b"\x89PNG") if isinstance(data, bytes) else "<html" in data[:200].lower()):
            return (write_bytes if isinstance(data, bytes) else write_text)(self, data, *args, **kwargs)
        with open(self, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        main(["influence", "report", "--run", str(run), "--show", "1", "--png"])
    monkeypatch.undo()
    assert (run / "report.html").read_bytes() == html
    assert (run / "report-query0.png").read_bytes() == png
    assert not list(run.rglob("*.tmp"))


def test_blocks_of_an_interrupted_fit_are_not_reused(tmp_path, model_dir, corpus):
    """Blocks stored just before a fit was killed (no config yet) are read again for the new settings."""
    run = tmp_path / "run"
    assert main(_fit(run, model_dir, corpus)) == 0
    for path in run.iterdir():
        if path.name != "tokens":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main([*_fit(run, model_dir, corpus), "--block-size", "12"]) == 0
    assert load_tensors(run / "tokens" / "result.safetensors")[0]["blocks"].shape == (12, 12)


def test_block_strategy_weight_decay_and_full_scores_from_the_command_line(
    tmp_path, model_dir, corpus, capsys
):
    """--block-max-params/--unit-max-params fit exact and per-unit blocks, --strategy block/unit use them,
    --weight-decay adds to the damping and --full-scores writes every score; --samples with --empirical
    is refused."""
    from safetensors.torch import load_file

    q = _queries(tmp_path / "q.jsonl", [{"prompt": "the lazy ", "completion": "dog jumps"}])
    assert "--samples" in _fails(
        capsys, [*_fit(tmp_path / "bad", model_dir, corpus), "--empirical", "--samples", "2"]
    )
    run = tmp_path / "run"
    assert (
        main(_fit(run, model_dir, corpus, "--block-max-params", "100000", "--unit-max-params", "10000000"))
        == 0
    )
    factors = load_tensors(run / "lambda" / "factors.safetensors")[0]
    assert any(k.endswith("/block") for k in factors) and any(k.endswith("/unit") for k in factors)
    assert (
        main(
            ["influence", "score", "--run", str(run), "--queries", q, "--strategy", "unit", "--name", "unit"]
        )
        == 0
    )
    argv = ["influence", "score", "--run", str(run), "--queries", q, "--strategy", "block"]
    assert main([*argv, "--weight-decay", "0.01", "--full-scores", "--name", "full"]) == 0
    matrix = load_file(run / "full" / "full.safetensors")["scores"]
    assert matrix.shape == (12, 1) and torch.isfinite(matrix).all()
    top = load_tensors(run / "full" / "result.safetensors")[0]
    assert torch.equal(top["top_index"][0], matrix[:, 0].argsort(descending=True)[:10])
    assert json.loads((run / "full_queries" / "args.json").read_text())["weight_decay"] == 0.01
