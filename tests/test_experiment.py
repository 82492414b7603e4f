import json

import pytest

from steerlab.data import DataFormatError, PairedTexts, PromptSet, load_builtin
from steerlab.data.experiment import KEYS, load_experiment
from steerlab.data.sources import DataRef, load_dataset
from steerlab.errors import UserError


def _write(tmp_path, content, name="exp.json"):
    path = tmp_path / name
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return path


def test_a_full_experiment_is_read_and_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.txt").write_text("My day was\nThe film was\n")
    path = _write(
        tmp_path,
        {
            "description": "sentiment on a tiny model",
            "model": "smollm2-135m",
            "contrast": {"positive": ["I love it."], "negative": ["I hate it."]},
            "evaluation": {"path": "data/prompts.txt", "limit": 1},
            "words": {"positive": ["great"], "negative": ["awful"]},
            "neutral": ["The sky is blue."],
            "vector": "out/vec",
            "layers": "1-3",
            "layer": -1,
            "fraction": 0.05,
            "multipliers": [-2, 2.5],
            "positions": "from:-2",
            "prompts": ["Hello"],
            "chat": False,
        },
    )
    exp = load_experiment(path)
    assert isinstance(exp.contrast.source, PairedTexts) and exp.contrast.source.positive == ["I love it."]
    assert exp.evaluation == DataRef(str(tmp_path / "data" / "prompts.txt"), None, 1)
    assert load_dataset(exp.evaluation).prompts == ["My day was"]
    assert exp.words == {"positive": ["great"], "negative": ["awful"]}
    assert exp.vector == str(tmp_path / "out" / "vec")
    assert (exp.layers, exp.layer, exp.fraction, exp.multipliers) == ([1, 2, 3], -1, 0.05, [-2.0, 2.5])
    assert exp.fractions is None and exp.chat is False and exp.positions == "from:-2"


def test_the_builtin_example_names_builtin_data():
    exp = load_experiment("builtin:sentiment")
    assert exp.contrast == DataRef("builtin:sentiment")
    assert exp.words == load_builtin("sentiment-words")


def test_yaml_experiments(tmp_path):
    path = _write(tmp_path, "layers: [1, 2]\nevaluation:\n  - first prompt\n  - second prompt\n", "exp.yaml")
    exp = load_experiment(path)
    assert exp.layers == [1, 2] and isinstance(exp.evaluation.source, PromptSet)
    bad = _write(tmp_path, "layers: [1, 2\n", "bad.yaml")
    with pytest.raises(DataFormatError, match=r"bad\.yaml: line \d+: invalid YAML"):
        load_experiment(bad)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"layer": "16"}, r"field 'layer': expected an integer, got '16'"),
        ({"layres": [1]}, r"field 'layres': unknown key; the keys are description, model"),
        ({"layers": [1, "x"]}, r"field 'layers\[1\]': expected an integer"),
        ({"layers": "1,x"}, r"field 'layers': cannot read '1,x'"),
        ({"fractions": []}, r"field 'fractions': expected a non-empty list of numbers"),
        (
            {"fraction": 0.1, "multiplier": 2},
            r"field 'multiplier': give 'fraction' or 'multiplier', not both",
        ),
        ({"contrast": "missing.json"}, r"field 'contrast': no such file: .*missing\.json"),
        (
            {"contrast": {"positive": ["a", "b"], "negative": ["c"]}},
            r"field 'contrast\.negative': has 1 texts",
        ),
        ({"contrast": [{"question": "Q"}]}, r"field 'contrast': an inline list holds prompt strings"),
        (
            {"evaluation": {"path": "x.json", "split": "dev"}},
            r"field 'evaluation\.split': 'dev' is not one of train",
        ),
        ({"evaluation": {"file": "x.json"}}, r"field 'evaluation': expected a file name"),
        (
            {"words": {"positive": ["good day"], "negative": ["bad"]}},
            r"field 'words\.positive\[0\]': expected a single word",
        ),
        ({"words": {"pos": ["good"]}}, r"field 'words\.positive': missing"),
        ({"read": "first"}, r"field 'read': 'first' is not one of last, mean"),
        ({"chat": "yes"}, r"field 'chat': expected true or false"),
    ],
)
def test_errors_name_the_file_and_field(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(DataFormatError, match=r"exp\.json: " + message):
        load_experiment(path)


def test_not_an_object_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(
        DataFormatError, match=r"exp\.json: expected an object of experiment settings, got list"
    ):
        load_experiment(_write(tmp_path, [1]))
    with pytest.raises(UserError, match=r"--experiment: no such file"):
        load_experiment(tmp_path / "nope.json")
    with pytest.raises(UserError, match=r"--experiment: no built-in experiment 'nope'; available: sentiment"):
        load_experiment("builtin:nope")
    assert "contrast" in KEYS and "path" not in KEYS


def test_the_readme_example_is_a_valid_experiment_and_the_readme_names_no_private_data(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "../shared" not in readme
    example = readme.split("## Experiment files", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    exp = load_experiment(_write(tmp_path, example, "experiment.json"))
    assert isinstance(exp.contrast.source, PairedTexts) and isinstance(exp.evaluation.source, PromptSet)
    assert exp.vector == str(tmp_path / "vectors" / "mood") and exp.fractions == [-0.1, -0.05, 0.05, 0.1]
