"""`steerlab hessian ...` command line on tiny inputs: results, one-line errors before any model loads,
atomic outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.cli import main
from steerlab.hessian.cli import add_subcommands

PARAGRAPH = "the quick brown fox jumps over the lazy dog."


def test_parser_wiring():
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    for cmd in ("spectrum", "density", "trace"):
        args = parser.parse_args(["hessian", cmd, "--text", "x.txt", "--out", "o"])
        assert callable(args.func) and args.model == "smollm2-135m"
    args = parser.parse_args(["hessian", "separate", "--out", "o"])
    assert args.task == "hybrid-digits" and args.t == 4.0 and args.layers == "-2,-1"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    text = folder / "text.txt"
    text.write_text("\n\n".join(f"paragraph {i}: {PARAGRAPH}" for i in range(6)))
    return folder, text


def common_args(folder: Path, text: Path) -> list[str]:
    return [
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


def test_spectrum_density_trace_commands(tiny_folder, tmp_path, capsys):
    from steerlab.hessian import Eigenpairs, SpectralDensity

    common = common_args(*tiny_folder)
    assert (
        main(["hessian", "spectrum", *common, "--k", "3", "--which", "BE", "--out", str(tmp_path / "s")]) == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    eig = Eigenpairs.load(tmp_path / "s", "spectrum")
    assert eig.values.tolist() == out["values"] and eig.vectors.shape == (6, 64 * 32)
    assert max(out["residuals"]) < 1e-6 * max(abs(v) for v in out["values"])
    assert eig.meta["operator"]["params"] == {"model.layers.0.mlp.down_proj.weight": [32, 64]}
    assert eig.meta["n_texts"] == 3 and eig.meta["text"] == str(tiny_folder[1])
    assert (tmp_path / "s" / "spectrum.png").read_bytes().startswith(b"\x89PNG")
    low = ["--k", "3", "--which", "BE", "--basis-dtype", "float32", "--basis-dir", str(tmp_path / "krylov")]
    assert main(["hessian", "spectrum", *common, *low, "--out", str(tmp_path / "s32")]) == 0
    eig32 = Eigenpairs.load(tmp_path / "s32", "spectrum")
    assert torch.allclose(eig32.values, eig.values, rtol=1e-5) and eig32.meta["basis"] == "float32 file"
    assert not list((tmp_path / "krylov").iterdir())
    assert (
        main(["hessian", "density", *common, "--probes", "2", "--steps", "10", "--out", str(tmp_path / "d")])
        == 0
    )
    dens = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(dens["integral"] - 1) < 1e-2
    assert dens["support"][1] == pytest.approx(max(out["values"]), rel=1e-3)
    saved = SpectralDensity.load(tmp_path / "d", "density")
    assert saved.n_products == dens["n_products"] == 2 * 10
    assert (tmp_path / "d" / "density.png").read_bytes().startswith(b"\x89PNG")
    assert main(["hessian", "trace", *common, "--products", "12", "--out", str(tmp_path / "t")]) == 0
    tr = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tr["low"] <= tr["trace"] <= tr["high"]
    assert json.loads((tmp_path / "t" / "trace.json").read_text())["estimate"] == tr["trace"]
    assert json.loads((tmp_path / "t" / "trace_meta.json").read_text())["operator"]["dim"] == 64 * 32


# ------------------------------------------------------------------ errors: one line, status 2


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: these inputs must be refused before that."""
    import steerlab.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(steerlab.models, "load_model", refuse)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the command; it must return 2 and print exactly one `steerlab: error:` line."""
    assert main(["hessian", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("steerlab: error: "), err
    return err[0]


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(f"one: {PARAGRAPH}\n\ntwo: {PARAGRAPH}\n")
    return path


def test_missing_text_file_is_refused_before_the_model_loads(no_model, tmp_path, capsys):
    missing = tmp_path / "nowhere.txt"
    for cmd in ("spectrum", "density", "trace"):
        line = one_line_error(capsys, [cmd, "--text", str(missing), "--out", str(tmp_path / "o")])
        assert str(missing) in line and "no such file" in line
    line = one_line_error(capsys, ["spectrum", "--text", str(tmp_path), "--out", str(tmp_path / "o")])
    assert f"--text: not a file: {tmp_path}" in line


def test_undecodable_text_is_an_error_naming_file_and_byte(no_model, tmp_path, capsys):
    """Bytes that are not UTF-8 used to be replaced silently."""
    from steerlab.data.errors import DataFormatError
    from steerlab.hessian.lm import read_texts

    head = f"one: {PARAGRAPH}\n\ntwo: ".encode()
    path = tmp_path / "latin1.txt"
    path.write_bytes(head + "caf\xe9 ".encode("latin-1") + PARAGRAPH.encode())
    offset = len(head) + 3
    with pytest.raises(DataFormatError, match=f"byte {offset}"):
        read_texts(path)
    line = one_line_error(capsys, ["spectrum", "--text", str(path), "--out", str(tmp_path / "o")])
    assert str(path) in line and f"byte {offset}" in line
    text_a = tmp_path / "a.txt"
    text_a.write_text(f"one: {PARAGRAPH}\n")
    line = one_line_error(
        capsys, ["separate", "--task", "text", "--text-a", str(text_a), "--text-b", str(path), "--out", "o"]
    )
    assert str(path) in line and f"byte {offset}" in line


def test_text_without_long_enough_paragraph(no_model, tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("too short\n\nalso short\n")
    line = one_line_error(capsys, ["trace", "--text", str(path), "--out", str(tmp_path / "o")])
    assert str(path) in line and "no paragraph of at least 40 characters" in line


def test_bad_layer_syntax_is_refused_before_the_model_loads(no_model, text_file, tmp_path, capsys):
    out = str(tmp_path / "o")
    line = one_line_error(capsys, ["spectrum", "--text", str(text_file), "--layers", "1-x", "--out", out])
    assert "--layers" in line and "'1-x'" in line
    line = one_line_error(
        capsys,
        [
            "separate",
            "--task",
            "text",
            "--text-a",
            str(text_file),
            "--text-b",
            str(text_file),
            "--layers=a",
            "--out",
            out,
        ],
    )
    assert "--layers" in line


def test_unwritable_output_folder_is_refused_before_the_model_loads(
    no_model, text_file, tmp_path, capsys, monkeypatch
):
    blocked = text_file / "results"  # a folder inside a regular file cannot be created
    for argv in (
        ["spectrum", "--text", str(text_file), "--out", str(blocked)],
        ["separate", "--out", str(blocked)],
        [
            "separate",
            "--task",
            "text",
            "--text-a",
            str(text_file),
            "--text-b",
            str(text_file),
            "--out",
            str(blocked),
        ],
    ):
        line = one_line_error(capsys, argv)
        assert f"--out {blocked}: {text_file} is not a folder" in line
    import steerlab.hessian.outputs as outputs

    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    line = one_line_error(capsys, ["density", "--text", str(text_file), "--out", str(tmp_path / "a" / "b")])
    assert f"--out {tmp_path / 'a' / 'b'}: {tmp_path} is not writable" in line
    assert not (tmp_path / "a").exists()


def test_separate_text_needs_both_text_files(no_model, text_file, capsys):
    line = one_line_error(capsys, ["separate", "--task", "text", "--text-a", str(text_file), "--out", "o"])
    assert "--text-a" in line and "--text-b" in line


def test_layer_out_of_range_and_empty_selection(tiny_folder, tmp_path, capsys):
    folder, text = tiny_folder
    base = ["spectrum", "--model", str(folder), "--text", str(text), "--out", str(tmp_path)]
    assert main(["hessian", *base, "--layers", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "steerlab: error: layer 7 is out of range for a model with 4 decoder layers (use 0..3 or -4..-1)"
    )
    assert main(["hessian", *base, "--layers", "0", "--include", "no_such_weight"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("steerlab: error: no parameter matches include=['no_such_weight']")
    assert not any("Traceback" in line for line in err)


# ------------------------------------------------------------------ atomic outputs


def test_failed_plot_keeps_the_previous_png(tiny_folder, tmp_path, monkeypatch):
    """A write that fails half-way (disk full) must leave the previous complete file, and no temp file."""
    from matplotlib.figure import Figure

    out = tmp_path / "s"
    out.mkdir()
    (out / "spectrum.png").write_bytes(b"previous complete png")

    def disk_full(self, fname, *args, **kwargs):
        if hasattr(fname, "write"):
            fname.write(b"partial")
        else:
            Path(fname).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space left"):
        main(["hessian", "spectrum", *common_args(*tiny_folder), "--k", "2", "--out", str(out)])
    assert (out / "spectrum.png").read_bytes() == b"previous complete png"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_negative_layers_and_separate_text(tiny_folder, tmp_path, capsys):
    from steerlab.hessian import Eigenpairs

    folder, text = tiny_folder
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"other {i}: pack my box with five dozen liquor jugs." for i in range(3)))
    base = ["--model", str(folder), "--dtype", "float64", "--n-texts", "2", "--threads", "1"]
    out = tmp_path / "t"
    argv = [
        "hessian",
        "trace",
        *base,
        "--text",
        str(text),
        "--layers",
        "-1",
        "--include",
        "down",
        "--products",
        "3",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    meta = json.loads((out / "trace_meta.json").read_text())
    assert list(meta["operator"]["params"]) == ["model.layers.3.mlp.down_proj.weight"]
    out = tmp_path / "sep"
    argv = ["hessian", "separate", "--task", "text", *base, "--text-a", str(text), "--text-b", str(other)]
    assert main([*argv, "--layers", "-2,-1", "--part", "attention", "--k", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "separation.json").read_text())
    assert (
        saved == summary
        and len(saved["principal_angles_deg"]) == 2
        and saved["dim"] == 2 * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32)
    )
    eig = Eigenpairs.load(out, "eigenpairs_a")
    assert (
        eig.meta["layers"] == [-2, -1]
        and eig.meta["part"] == "attention"
        and eig.vectors.shape == (2, saved["dim"])
    )


def test_python_api_checks_arguments_before_loading(no_model, text_file, tmp_path):
    from steerlab.errors import UserError
    from steerlab.hessian.commands import (
        DensityArgs,
        SeparateArgs,
        SpectrumArgs,
        TraceArgs,
        density,
        separate,
        spectrum,
        trace,
    )

    common = {"text": text_file, "out": tmp_path / "o"}
    with pytest.raises(UserError, match="--which: 'XX' is not one of LA, SA, LM, BE"):
        spectrum(SpectrumArgs(**common, which="XX"))
    with pytest.raises(UserError, match="--method: 'exact'"):
        trace(TraceArgs(**common, method="exact"))
    with pytest.raises(UserError, match="--dtype: unknown dtype 'float8'"):
        density(DensityArgs(**common, dtype="float8"))
    with pytest.raises(UserError, match="--part: 'head'"):
        density(DensityArgs(**common, part="head"))
    with pytest.raises(UserError, match="--task: 'images'"):
        separate(SeparateArgs(out=tmp_path, task="images"))
    for cls, function, option, name in (
        (SpectrumArgs, spectrum, "--n-texts", "n_texts"),
        (SpectrumArgs, spectrum, "--max-iter", "max_iter"),
        (DensityArgs, density, "--probes", "probes"),
        (TraceArgs, trace, "--products", "products"),
    ):
        with pytest.raises(UserError, match=f"{option}: must be at least 1, got 0"):
            function(cls(**common, **{name: 0}))


def test_options_help_and_defaults_come_from_the_dataclasses(capsys):
    from dataclasses import fields

    from steerlab.hessian.commands import DensityArgs, SeparateArgs, SpectrumArgs, TraceArgs
    from steerlab.options import field_default

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    for cls, name in ((SpectrumArgs, "spectrum"), (DensityArgs, "density"), (TraceArgs, "trace")):
        parsed = vars(parser.parse_args(["hessian", name, "--text", "t.txt", "--out", "o"]))
        expected = {f.name: field_default(cls, f.name) for f in fields(cls) if f.name != "progress"}
        assert {k: parsed[k] for k in expected} == {**expected, "text": "t.txt", "out": "o"}
    parsed = parser.parse_args(["hessian", "separate", "--out", "o", "--seeds", "1", "2"])
    assert parsed.seeds == [1, 2] and field_default(SeparateArgs, "seeds") == [10, 11, 12, 13, 14]
    parsed = parser.parse_args(
        ["hessian", "trace", "--text", "t", "--out", "o", "--include", "a", "--include", "b"]
    )
    assert parsed.include == ["a", "b"]
    with pytest.raises(SystemExit):
        parser.parse_args(["hessian", "spectrum", "--help"])
    assert "eigenpairs (default: 10)" in capsys.readouterr().out


def test_python_api_runs_a_command(tiny_folder, tmp_path):
    from steerlab.hessian import Eigenpairs
    from steerlab.hessian.commands import SpectrumArgs, spectrum

    folder, text = tiny_folder
    args = SpectrumArgs(
        model=str(folder),
        dtype="float64",
        text=text,
        layers=[-1],
        include=["down_proj"],
        k=2,
        out=tmp_path,
        progress=False,
    )
    summary = spectrum(args)
    eig = Eigenpairs.load(tmp_path, "spectrum")
    assert summary["values"] == eig.values.tolist() and eig.meta["text"] == str(text)
    assert list(eig.meta["operator"]["params"]) == ["model.layers.3.mlp.down_proj.weight"]
