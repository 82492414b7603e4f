import json
import subprocess
import sys

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.cli import build_parser, main
from steerlab.errors import UserError


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "steerlab.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("extract", "evaluate", "sweep", "generate", "demo", "hessian", "influence"):
        assert command in out.stdout


def test_extract_evaluate_sweep_generate(tiny_folder, tmp_path, capsys):
    vec = tmp_path / "vec"
    main(
        [
            "extract",
            "--model",
            str(tiny_folder),
            "--data",
            "builtin:sentiment",
            "--layers",
            "1,2",
            "--out",
            str(vec),
        ]
    )
    meta = json.loads(vec.with_suffix(".json").read_text())
    assert meta["method"] == "mean-difference-last" and meta["layers"] == [1, 2]
    ab = tmp_path / "ab.json"
    ab.write_text(
        json.dumps(
            [
                {
                    "question": "Q?\n\nChoices:\n (A) x\n (B) y",
                    "answer_matching_behavior": "(A)",
                    "answer_not_matching_behavior": "(B)",
                }
            ]
            * 4
        )
    )
    results = tmp_path / "eval.json"
    main(
        [
            "evaluate",
            "--model",
            str(tiny_folder),
            "--vector",
            str(vec),
            "--data",
            str(ab),
            "--layer",
            "2",
            "--multiplier",
            "3",
            "--json",
            str(results),
        ]
    )
    data = json.loads(results.read_text())
    assert set(data) >= {"unsteered", "-m", "+m"} and data["multiplier"] == 3
    assert data["+m"]["score"] != data["unsteered"]["score"]
    csv_path = tmp_path / "sweep.csv"
    main(
        [
            "sweep",
            "--model",
            str(tiny_folder),
            "--vector",
            str(vec),
            "--data",
            str(ab),
            "--fractions=-0.1,0.1",
            "--out",
            str(csv_path),
        ]
    )
    assert len(csv_path.read_text().splitlines()) == 1 + 2 + 2 * 2 * 2
    assert csv_path.with_suffix(".png").exists()
    main(
        [
            "generate",
            "--model",
            str(tiny_folder),
            "--vector",
            str(vec),
            "--layer",
            "1",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "4",
        ]
    )
    assert "steered (layer 1" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tmp_path, tiny_folder, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(
        '[{"question": "Q", "answer_matching_behavior": "A)", "answer_not_matching_behavior": "(B)"}]'
    )
    args = ["extract", "--model", str(tiny_folder), "--layers", "1", "--out", str(tmp_path / "v")]
    assert main([*args, "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.json: record 0: field 'answer_matching_behavior'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match=r"bad.json: record 0"):  # -v: the traceback is kept
        main(["-v", *args, "--data", str(bad)])
    assert main([*args, "--data", str(tmp_path / "missing.json")]) == 2
    assert "no such data file" in capsys.readouterr().err


def test_parser_requires_a_command():
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
