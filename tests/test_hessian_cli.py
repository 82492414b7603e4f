"""`steerlab hessian ...` command line on tiny inputs."""

from __future__ import annotations

import argparse
import json

import pytest

from conftest import char_tokenizer, tiny_model
from steerlab.hessian.cli import add_subcommands, main


def test_parser_wiring():
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    for cmd in ("spectrum", "density", "trace"):
        args = parser.parse_args(["hessian", cmd, "--text", "x.txt", "--out", "o"])
        assert callable(args.func) and args.model == "smollm2-135m"
    args = parser.parse_args(["hessian", "separate", "--out", "o"])
    assert args.task == "hybrid-digits" and args.t == 4.0


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    text = folder / "text.txt"
    text.write_text(
        "\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(6))
    )
    return folder, text


def test_spectrum_density_trace_commands(tiny_folder, tmp_path, capsys):
    from steerlab.hessian import Eigenpairs

    folder, text = tiny_folder
    common = [
        "--model",
        str(folder),
        "--dtype",
        "float64",
        "--text",
        str(text),
        "--n-texts",
        "3",
        "--layers",
        "0",
        "--include",
        "down_proj",
        "--threads",
        "1",
    ]
    main(["spectrum", *common, "--k", "3", "--which", "BE", "--out", str(tmp_path / "s")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    eig = Eigenpairs.load(tmp_path / "s", "spectrum")
    assert eig.values.tolist() == out["values"] and eig.vectors.shape == (6, 64 * 32)
    assert max(out["residuals"]) < 1e-6 * max(abs(v) for v in out["values"])
    assert eig.meta["operator"]["params"] == {"model.layers.0.mlp.down_proj.weight": [32, 64]}
    assert (tmp_path / "s" / "spectrum.png").stat().st_size > 0
    main(["density", *common, "--probes", "2", "--steps", "10", "--out", str(tmp_path / "d")])
    dens = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(dens["integral"] - 1) < 1e-2
    assert dens["support"][1] == pytest.approx(max(out["values"]), rel=1e-3)
    main(["trace", *common, "--products", "12", "--out", str(tmp_path / "t")])
    tr = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tr["low"] <= tr["trace"] <= tr["high"]
