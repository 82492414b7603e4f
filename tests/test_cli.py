import csv
import json
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.cli import build_parser, main
from steerlab.data import DataRef, PairedTexts
from steerlab.data.sources import load_dataset
from steerlab.errors import UserError
from steerlab.steering import SteeringVector


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
    assert "no such file" in capsys.readouterr().err


def test_parser_requires_a_command():
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


# --- every input checked before the model loads; one-line errors with status 2 -------------------------

AB_ITEM = {
    "question": "Q?\n\nChoices:\n (A) x\n (B) y",
    "answer_matching_behavior": "(A)",
    "answer_not_matching_behavior": "(B)",
}


class ModelLoaded(Exception):
    """Raised instead of loading a model, to prove that validation came first."""


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr("steerlab.models.load_model", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def vec(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("vector") / "vec"
    args = ["--model", tiny, "--data", "builtin:sentiment", "--layers", "1,2", "--out", str(path)]
    assert main(["--quiet", "extract", *args]) == 0
    return str(path)


@pytest.fixture
def ab(tmp_path):
    path = tmp_path / "ab.json"
    path.write_text(json.dumps([AB_ITEM] * 4))
    return str(path)


def one_line_error(capsys, argv) -> str:
    """Run `steerlab ARGV`; check status 2 and one line on stderr without a traceback; return the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'[\n  {"question": "Q",\n   "answer_matching_behavior": }\n]', "bad.json: line 3: invalid JSON"),
        (b"", "bad.json: the file is empty"),
        (b'[{"question": "caf\xe9"}]', "bad.json: line 1: not UTF-8 text"),
    ],
)
def test_malformed_data_names_the_file(no_model, vec, tmp_path, capsys, content, expected):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    extract = ["extract", "--data", str(bad), "--layers", "1", "--out", str(tmp_path / "v")]
    assert expected in one_line_error(capsys, extract)
    evaluate = ["evaluate", "--vector", vec, "--layer", "1", "--data", str(bad)]
    assert expected in one_line_error(capsys, evaluate)


def test_inputs_are_checked_before_the_model_loads(no_model, vec, ab, tmp_path, capsys):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    steer = ["--vector", vec, "--layer", "2", "--data", ab]
    missing = str(tmp_path / "missing.json")
    one_item = tmp_path / "one.json"
    one_item.write_text(json.dumps([AB_ITEM]))
    one_item = str(one_item)
    cases = [
        ("--data: no such file", ["extract", "--data", missing, "--layers", "1", "--out", "v"]),
        (
            "--data: builtin:sentiment holds paired texts; evaluate needs A/B items or prompts",
            ["evaluate", "--vector", vec, "--layer", "1", "--data", "builtin:sentiment"],
        ),
        (
            "--data: builtin:sentiment-prompts holds prompts; extraction needs",
            ["extract", "--data", "builtin:sentiment-prompts", "--layers", "1", "--out", "v"],
        ),
        ("--vector: ", ["evaluate", "--vector", str(tmp_path / "nope"), "--layer", "1", "--data", ab]),
        ("nope.safetensors: no such file", ["sweep", "--vector", str(tmp_path / "nope"), "--data", ab]),
        ("layer 7 is out of range", ["evaluate", "--vector", vec, "--layer", "7", "--data", ab]),
        ("--layer: the vector has layers [1, 2]", ["evaluate", "--vector", vec, "--data", ab]),
        (
            f"{blocked} is not a folder",
            ["extract", "--data", "builtin:sentiment", "--layers", "1", "--out", str(blocked / "v")],
        ),
        (
            f"--json {blocked / 'r.json'}: {blocked} is not a folder",
            ["evaluate", *steer, "--json", str(blocked / "r.json")],
        ),
        (
            f"{blocked} is not a folder",
            ["sweep", "--vector", vec, "--data", ab, "--out", str(blocked / "s.csv")],
        ),
        ("--prompt: give --prompt TEXT", ["generate", "--vector", vec, "--layer", "1"]),
        ("--prompts-file: no such file", ["generate", "--prompts-file", str(tmp_path / "p.txt")]),
        (
            "--data: required (or 'contrast' in the --experiment file)",
            ["extract", "--layers", "1", "--out", "v"],
        ),
        ("--limit: must be at least 1", ["evaluate", *steer, "--limit", "0"]),
        ("balancing", ["extract", "--data", one_item, "--layers", "1", "--out", "v"]),
        (
            "--system-prompt: paired texts take a system prompt only with --chat",
            ["extract", "--data", "builtin:sentiment", "--layers", "1", "--out", "v", "--system-prompt", "x"],
        ),
    ]
    for expected, argv in cases:
        assert expected in one_line_error(capsys, argv), argv
    with pytest.raises(ModelLoaded):  # everything valid: the next step is loading the model
        main(["evaluate", *steer])


def test_prompt_data_needs_word_lists_except_the_builtin_sentiment_prompts(no_model, vec, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The answer is\nMy view is\n")
    run = ["evaluate", "--vector", vec, "--layer", "1", "--data"]
    err = one_line_error(capsys, [*run, str(prompts)])
    assert "--words: prompt data is scored by word preference" in err and "builtin:sentiment-prompts" in err
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"positive": ["I had a lovely day."], "negative": ["I had an awful day."]}))
    err = one_line_error(capsys, [*run, str(prompts), "--words", str(pairs)])
    assert "pairs.json: field 'positive[0]': expected a single word" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"good": ["great"], "bad": ["awful"]}))
    assert "other.json: field 'positive': missing" in one_line_error(
        capsys, [*run, str(prompts), "--words", str(other)]
    )
    with pytest.raises(ModelLoaded):  # the sentiment prompts default to the sentiment words
        main([*run, "builtin:sentiment-prompts"])


# --- option syntax ------------------------------------------------------------------------------------


def test_every_help_example_parses_and_names_only_data_a_user_has():
    from steerlab.cli import EXAMPLES, join_negative_values

    lines = [line.strip() for line in EXAMPLES.splitlines() if line.strip().startswith("steerlab ")]
    assert len(lines) >= 6 and "../shared" not in EXAMPLES
    for line in lines:
        args = build_parser().parse_args(join_negative_values(shlex.split(line)[1:]))
        if args.command == "sweep":
            assert args.fractions == "-0.1,0.1"


def test_negative_values_after_long_options():
    from steerlab.cli import join_negative_values

    argv = ["sweep", "--fractions", "-0.1,0.1", "--layers", "-4,-1", "--multiplier", "-1e9", "--", "-3"]
    assert join_negative_values(argv) == [
        "sweep",
        "--fractions=-0.1,0.1",
        "--layers=-4,-1",
        "--multiplier=-1e9",
        "--",
        "-3",
    ]
    assert join_negative_values(["-v", "-1"]) == ["-v", "-1"]


def test_sweep_help_example_syntax_and_raw_multipliers(tiny, vec, ab, tmp_path):
    fractions = tmp_path / "fractions.csv"
    argv = ["sweep", "--model", tiny, "--vector", vec, "--data", ab, "--layers", "1,2"]
    assert main(["-q", *argv, "--fractions", "-0.1,0.1", "--out", str(fractions)]) == 0
    rows = list(csv.DictReader(fractions.open()))
    assert sorted({float(r["fraction"]) for r in rows}) == [-0.1, 0.0, 0.1]
    raw = tmp_path / "raw.csv"
    assert main(["-q", *argv, "--multipliers", "-2,2", "--out", str(raw)]) == 0
    vector = SteeringVector.load(vec)
    rows = [r for r in csv.DictReader(raw.open()) if r["vector"] != "none"]
    assert len(rows) == 2 * 2 * 2 and {float(r["multiplier"]) for r in rows} == {-2.0, 2.0}
    for r in rows:
        layer = int(r["layer"])
        expected = float(r["multiplier"]) * vector.norm(layer) / vector.residual_norm(layer)
        assert float(r["fraction"]) == pytest.approx(expected, rel=1e-6)
        assert float(r["added_norm"]) == pytest.approx(2 * vector.norm(layer), rel=1e-6)
    assert raw.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit):  # one or the other
        main([*argv, "--fractions", "0.1", "--multipliers", "2"])


# --- outputs, progress, logging -----------------------------------------------------------------------


def test_evaluate_json_is_valid_json_written_atomically(tiny, vec, ab, tmp_path, monkeypatch):
    from steerlab.evaluate import SideEffects

    monkeypatch.setattr(
        "steerlab.steering.metrics.side_effects", lambda lm, neutral: SideEffects(float("nan"), float("inf"))
    )
    results = tmp_path / "out" / "eval.json"
    argv = [
        "-q",
        "evaluate",
        "--model",
        tiny,
        "--vector",
        vec,
        "--data",
        ab,
        "--layer",
        "2",
        "--multiplier",
        "3",
    ]
    assert main([*argv, "--json", str(results)]) == 0

    def reject(constant):
        raise AssertionError(f"invalid JSON constant {constant}")

    data = json.loads(results.read_text(), parse_constant=reject)
    assert data["+m"]["perplexity"] is None and data["+m"]["kl"] is None and data["multiplier"] == 3
    assert data["unsteered"]["chance"] == 0.5 and data["unsteered"]["n_items"] == 4
    assert sorted(p.name for p in results.parent.iterdir()) == ["eval.json"]  # no temporary file left


def test_progress_bars_quiet_and_verbose_logging(tiny, tmp_path, capsys, caplog):
    base = ["extract", "--model", tiny, "--data", "builtin:sentiment", "--layers", "1", "--out"]
    assert main([*base, str(tmp_path / "a")]) == 0
    assert "positive" in capsys.readouterr().err  # the extraction's progress bar
    assert main(["--quiet", *base, str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err == ""
    assert main(["-v", "-q", *base, str(tmp_path / "c")]) == 0
    assert "loading model" in caplog.text and "extracting from 54 items of builtin:sentiment" in caplog.text
    generate = ["generate", "--model", tiny, "--prompt", "hi", "--max-new-tokens", "2", "--no-chat"]
    assert main(generate) == 0
    assert "generating" in capsys.readouterr().err


def test_extract_split_and_limit(tiny, tmp_path):
    path = tmp_path / "v"
    argv = ["-q", "extract", "--model", tiny, "--data", "builtin:sentiment", "--layers", "1"]
    assert main([*argv, "--split", "train", "--limit", "5", "--out", str(path)]) == 0
    assert json.loads(path.with_suffix(".json").read_text())["dataset"]["size"] == 5
    assert main([*argv, "--split", "test", "--out", str(path)]) == 0
    assert json.loads(path.with_suffix(".json").read_text())["dataset"]["size"] == 11  # 20% of 54


@pytest.mark.parametrize("method", ["pca-diff", "pca-center", "probe"])
def test_extract_method_option(tiny, tmp_path, method):
    from steerlab.models import load_model
    from steerlab.steering.methods import extract_pca_center, extract_pca_diff, extract_probe

    path = tmp_path / "v"
    argv = ["-q", "extract", "--model", tiny, "--data", "builtin:sentiment", "--layers", "1,2"]
    assert main([*argv, "--method", method, "--limit", "8", "--out", str(path)]) == 0
    saved = SteeringVector.load(path)
    assert saved.metadata["method"] == method and saved.metadata["dataset"]["size"] == 8
    library = {"pca-diff": extract_pca_diff, "pca-center": extract_pca_center, "probe": extract_probe}[method]
    texts = load_dataset(DataRef("builtin:sentiment", limit=8), (PairedTexts,), "--data", "test")
    expected = library(load_model(tiny), texts, [1, 2], progress=False)
    for layer in (1, 2):
        torch.testing.assert_close(saved.vectors[layer], expected.vectors[layer])


def test_extract_method_defaults_to_mean_difference_and_refuses_unknown_ones(tiny, tmp_path):
    path = tmp_path / "v"
    argv = ["-q", "extract", "--model", tiny, "--data", "builtin:sentiment", "--layers", "1", "--limit", "4"]
    assert main([*argv, "--out", str(path)]) == 0
    assert json.loads(path.with_suffix(".json").read_text())["method"] == "mean-difference-last"
    with pytest.raises(SystemExit):
        main([*argv, "--method", "svd", "--out", str(path)])


# --- experiment files ---------------------------------------------------------------------------------


def test_one_experiment_file_drives_every_command(tiny, tmp_path, capsys):
    (tmp_path / "ab.json").write_text(json.dumps([AB_ITEM] * 4))
    experiment = tmp_path / "exp.json"
    experiment.write_text(
        json.dumps(
            {
                "model": tiny,
                "contrast": {
                    "positive": ["I love it.", "What joy."],
                    "negative": ["I hate it.", "What pain."],
                },
                "evaluation": "ab.json",
                "vector": "vectors/v",
                "layers": [1, 2],
                "layer": 2,
                "multiplier": 3,
                "fractions": [-0.1, 0.1],
                "prompts": ["hi"],
                "chat": False,
            }
        )
    )
    run = ["-q", "--experiment", str(experiment)]
    assert main([run[0], "extract", *run[1:]]) == 0
    meta = json.loads((tmp_path / "vectors" / "v.json").read_text())
    assert meta["layers"] == [1, 2] and meta["dataset"]["size"] == 2
    results = tmp_path / "r.json"
    assert main(["-q", "evaluate", *run[1:], "--json", str(results)]) == 0
    assert (
        json.loads(results.read_text())["layer"] == 2 and json.loads(results.read_text())["multiplier"] == 3
    )
    assert (
        main(["-q", "evaluate", *run[1:], "--layer", "1", "--fraction", "0.2", "--json", str(results)]) == 0
    )
    vector = SteeringVector.load(tmp_path / "vectors" / "v")
    data = json.loads(results.read_text())
    assert data["layer"] == 1 and data["multiplier"] == pytest.approx(vector.multiplier_for_fraction(1, 0.2))
    sweep_csv = tmp_path / "s.csv"
    assert main(["-q", "sweep", *run[1:], "--layers", "2", "--out", str(sweep_csv)]) == 0
    assert len(sweep_csv.read_text().splitlines()) == 1 + 1 + 2 * 2
    capsys.readouterr()
    assert main(["-q", "generate", *run[1:], "--max-new-tokens", "2"]) == 0
    assert "### hi" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layer": "2"}))
    assert "bad.json: field 'layer': expected an integer" in one_line_error(
        capsys, ["extract", "--experiment", str(bad)]
    )


def test_quiet_before_or_after_the_command():
    parser = build_parser()
    for argv in (["--quiet", "demo"], ["demo", "--quiet"], ["-q", "extract"], ["extract", "--quiet"]):
        assert parser.parse_args(argv).quiet is True
    assert parser.parse_args(["demo"]).quiet is False


def test_demo_takes_an_experiment_and_checks_its_data_before_loading(tmp_path, monkeypatch, capsys):
    from steerlab.steering import demo

    seen = {}

    def fake_demo(out, config):
        seen["config"] = config
        return {}

    monkeypatch.setattr(demo, "run_demo", fake_demo)
    monkeypatch.setattr("steerlab.steering.report.terminal_summary", lambda summary, out: "done")
    experiment = tmp_path / "exp.json"
    pairs = {"positive": ["I love it.", "Joy!"], "negative": ["I hate it.", "Pain!"]}
    words = {"positive": ["good"], "negative": ["bad"]}
    experiment.write_text(
        json.dumps({"contrast": pairs, "evaluation": ["It is"], "words": words, "layers": [1, 2]})
    )
    assert main(["-q", "demo", "--experiment", str(experiment), "--fractions", "-0.2,0.2"]) == 0
    config = seen["config"]
    assert config.layers == [1, 2] and config.fractions == [-0.2, 0.2] and config.words == words
    assert config.pairs.source.positive == pairs["positive"] and config.progress is False
    assert config.model == demo.DemoConfig.model and config.positions == "all"
    experiment.write_text(json.dumps({"multipliers": [2, 4]}))
    assert "gives multipliers; the demo sweeps fractions" in one_line_error(
        capsys, ["demo", "--experiment", str(experiment)]
    )
    monkeypatch.undo()
    monkeypatch.setattr(
        "steerlab.models.load_model", lambda *args, **kwargs: (_ for _ in ()).throw(ModelLoaded())
    )
    wrong = demo.DemoConfig(pairs="builtin:sentiment-prompts")
    with pytest.raises(
        UserError, match="contrast: builtin:sentiment-prompts holds prompts; the demo needs paired texts"
    ):
        demo.run_demo(tmp_path / "out", wrong)
    assert not (tmp_path / "out").exists()
    few = demo.DemoConfig(pairs=DataRef(PairedTexts(["a", "b"], ["c", "d"], "few")))
    with pytest.raises(UserError, match="few has 2 pairs and sentiment-prompts 44 prompts"):
        demo.run_demo(tmp_path / "out", few)
    with pytest.raises(ModelLoaded):
        demo.run_demo(tmp_path / "out", demo.DemoConfig(words={"positive": ["good"], "negative": ["bad"]}))


def test_value_checkers_name_the_option():
    from steerlab.influence.config import InfluenceArgumentError
    from steerlab.options import check_at_least, check_choice

    assert check_choice("a", ("a", "b"), "--x") == "a" and check_choice(None, ("a",), "--x") is None
    with pytest.raises(UserError, match=r"^--x: 'c' is not one of a, b$"):
        check_choice("c", ("a", "b"), "--x")
    assert check_at_least(2, 2, "--n") == 2 and check_at_least(None, 1, "--n") is None
    with pytest.raises(InfluenceArgumentError, match=r"^--n: must be at least 2, got 1$"):
        check_at_least(1, 2, "--n", InfluenceArgumentError)


def test_every_help_prints(capsys):
    parser = build_parser()
    commands = [[], ["extract"], ["evaluate"], ["sweep"], ["generate"], ["demo"], ["hessian", "trace"]]
    commands += [["influence", name] for name in ("fit", "score", "self", "report")]
    commands += [["vector"], ["vector", "export-gguf"], ["vector", "import-gguf"]]
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*command, "--help"])
        assert exit_.value.code == 0 and "usage: steerlab" in capsys.readouterr().out


def test_demo_checks_its_out_folder_before_loading(no_model, tmp_path, capsys):
    from steerlab.steering.demo import DemoConfig, run_demo

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder's parent should be")
    with pytest.raises(UserError, match=f"--out {blocked / 'out'}: {blocked} is not a folder"):
        run_demo(blocked / "out", DemoConfig())
    line = one_line_error(capsys, ["demo", "--out", str(blocked / "out")])
    assert line == f"steerlab: error: --out {blocked / 'out'}: {blocked} is not a folder"


def test_demo_loads_its_model_with_the_model_options(tmp_path, monkeypatch):
    from steerlab.steering import demo

    seen = {}

    def record(name, **kwargs):
        seen.update(kwargs, name=name)
        raise ModelLoaded

    monkeypatch.setattr("steerlab.models.load_model", record)
    with pytest.raises(ModelLoaded):
        demo.run_demo(tmp_path / "out", demo.DemoConfig(model="tiny", dtype="bfloat16", device="cpu"))
    assert (seen["name"], seen["dtype"], seen["device"]) == ("tiny", torch.bfloat16, "cpu")
    with pytest.raises(ModelLoaded):
        main(["-q", "demo", "--out", str(tmp_path / "out"), "--model", "other"])
    assert (seen["name"], seen["dtype"]) == ("other", None)


def test_generate_checks_the_vector_width_before_generating(tiny, tmp_path, monkeypatch, capsys):
    import steerlab.evaluate

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking the vector")

    monkeypatch.setattr(steerlab.evaluate, "generate", no_generation)
    SteeringVector({1: torch.ones(16)}).save(tmp_path / "narrow")
    argv = ["generate", "--model", tiny, "--vector", str(tmp_path / "narrow"), "--multiplier", "1"]
    line = one_line_error(capsys, ["-q", *argv, "--prompt", "Hi"])
    assert "steering vector: width 16" in line and "residual stream has width 32" in line


def test_demo_takes_the_model_options_of_every_command():
    args = build_parser().parse_args(["demo", "--device", "cpu", "--dtype", "bfloat16", "--model", "m"])
    assert (args.device, args.dtype, args.model) == ("cpu", "bfloat16", "m")
