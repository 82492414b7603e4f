"""Capability side effects: MMLU / TruthfulQA A/B accuracy against a direct computation, the loader's errors,
the pinned files, and `steerlab evaluate --capability`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from steerlab.cli import main
from steerlab.data import DataFormatError, encode, format_prompt
from steerlab.errors import UserError
from steerlab.evaluate.capability import (
    BENCHMARKS,
    CapabilityResult,
    capability,
    evaluate_capability,
    fetch_benchmark,
    load_benchmark,
    parse_benchmarks,
    prepare_benchmark,
)
from steerlab.hooks import Positions, steer
from steerlab.steering import SteeringVector
from steerlab.steering.commands import EvaluateArgs, evaluate

QUESTIONS = ["Is ice cold?", "2+2=?", "Sky colour?", "Capital of France?", "Cats bark?", "Water wet?"]


def _items(n_options: int = 2) -> list[dict]:
    items = []
    for k, question in enumerate(QUESTIONS):
        letters = "ABC"[:n_options]
        choices = "\n".join(f"({x}) answer {x.lower()}{k}" for x in letters)
        right = letters[k % n_options]
        wrong = letters[(k + 1) % n_options]
        items.append(
            {
                "prompt": f"{question}\n\nChoices:\n{choices}",
                "correct": f"({right})",
                "incorrect": f"({wrong})",
            }
        )
    return items


@pytest.fixture
def bench_file(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_items()))
    return path


def _direct(lm, items: list[dict]) -> tuple[list[bool], list[float]]:
    """Each item's letter probabilities from one forward pass over the chat prompt followed by "("."""
    correct, p_correct = [], []
    for item in items:
        prompt = format_prompt(lm.tokenizer, item["prompt"]) + "("
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([encode(lm.tokenizer, prompt)])).logits[0, -1]
        letters = [x for x in "ABC" if f"({x})" in item["prompt"]]
        scores = torch.stack([logits[lm.tokenizer.convert_tokens_to_ids(x)] for x in letters]).double()
        right = letters.index(item["correct"][1])
        correct.append(bool(scores[right] == scores.max()))
        p_correct.append(float(scores.log_softmax(-1).exp()[right]))
    return correct, p_correct


@pytest.mark.parametrize("n_options", [2, 3])
def test_accuracy_equals_a_direct_computation(tiny_lm, tmp_path, n_options):
    path = tmp_path / "bench.json"
    items = _items(n_options)
    path.write_text(json.dumps(items))
    dataset = load_benchmark(path)
    assert len(dataset) == len(QUESTIONS) and dataset.name == "bench"
    prompts = prepare_benchmark(tiny_lm, dataset)
    for vector in (None, torch.randn(32, dtype=torch.float64) * 4):
        if vector is None:
            result = capability(tiny_lm, prompts, "bench", batch_size=4)
            expected_correct, expected_p = _direct(tiny_lm, items)
        else:
            with steer(tiny_lm.model, {1: vector}):
                result = capability(tiny_lm, prompts, "bench", batch_size=4)
                expected_correct, expected_p = _direct(tiny_lm, items)
        assert result.correct.tolist() == expected_correct
        torch.testing.assert_close(result.p_correct, torch.tensor(expected_p, dtype=torch.float64))
        summary = result.summary(n_boot=100)
        assert summary["accuracy"] == pytest.approx(sum(expected_correct) / len(items))
        assert summary["ci"][0] <= summary["accuracy"] <= summary["ci"][1]
        assert summary["chance"] == pytest.approx(1 / n_options)
        assert summary["always_first_accuracy"] == pytest.approx(
            sum(item["correct"] == "(A)" for item in items) / len(items)
        )


def test_result_save_load_and_one_call(tiny_lm, bench_file, tmp_path):
    result = evaluate_capability(tiny_lm, bench_file, limit=4)
    assert len(result) == 4 and result.benchmark == "bench"
    result.save(tmp_path / "cap")
    again = CapabilityResult.load(tmp_path / "cap")
    assert torch.equal(again.correct, result.correct) and torch.equal(again.p_correct, result.p_correct)
    assert again.summary(n_boot=50) == result.summary(n_boot=50)


def test_loader_errors(tmp_path, bench_file):
    def write(content) -> str:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(content))
        return str(path)

    items = _items()
    with pytest.raises(DataFormatError, match=r"record 1: field 'correct': missing"):
        load_benchmark(write([items[0], {k: v for k, v in items[1].items() if k != "correct"}]))
    with pytest.raises(DataFormatError, match=r"record 0: field 'incorrect': \(C\) is not among the choices"):
        load_benchmark(write([{**items[0], "incorrect": "(C)"}]))
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        load_benchmark(write({"prompt": "x"}))
    with pytest.raises(UserError, match="--capability: 'mmlux' is neither mmlu nor truthfulqa nor a file"):
        load_benchmark("mmlux")
    with pytest.raises(UserError, match="--capability-limit: must be at least 1"):
        load_benchmark(bench_file, limit=0)
    assert parse_benchmarks("mmlu, truthfulqa,") == ["mmlu", "truthfulqa"]
    assert parse_benchmarks(None) == []
    with pytest.raises(UserError, match="--capability: no benchmark"):
        parse_benchmarks(" , ")


def test_limit_is_a_seeded_subset_in_file_order(bench_file):
    full = load_benchmark(bench_file)
    part = load_benchmark(bench_file, limit=3)
    assert [item.question for item in part] == [item.question for item in load_benchmark(bench_file, limit=3)]
    positions = [full.items.index(item) for item in part]
    assert positions == sorted(positions) and len(positions) == 3
    assert len(load_benchmark(bench_file, limit=100)) == len(full)


def test_the_pinned_files_verify_against_the_shared_copies(shared_data, tmp_path):
    mirror = tmp_path / "mirror"
    for name, local in (("mmlu", "caa/mmlu/mmlu.json"), ("truthfulqa", "caa/truthfulqa/truthful_qa.json")):
        target = mirror / BENCHMARKS[name].path
        target.parent.mkdir(parents=True)
        shutil.copy(shared_data / local, target)
        path = fetch_benchmark(name, cache_dir=tmp_path / "cache", mirror=str(mirror))
        assert path.read_bytes() == (shared_data / local).read_bytes()
    mmlu = load_benchmark(shared_data / "caa/mmlu/mmlu.json")
    truthful = load_benchmark(shared_data / "caa/truthfulqa/truthful_qa.json")
    assert (len(mmlu), len(truthful)) == (570, 817)
    assert all(item.options == ("(A)", "(B)") for item in [*mmlu, *truthful])


def test_evaluate_command_scores_capability_at_each_setting(tiny_lm, bench_file, tmp_path):
    SteeringVector({1: torch.randn(32, dtype=torch.float64)}).save(tmp_path / "vec")
    ab = tmp_path / "ab.json"
    ab.write_text(
        json.dumps(
            [{"question": i["prompt"], "answer_matching_behavior": i["correct"],
              "answer_not_matching_behavior": i["incorrect"]} for i in _items()]
        )
    )  # fmt: skip
    args = EvaluateArgs(
        vector=tmp_path / "vec",
        multiplier=3.0,
        data=str(ab),
        neutral=["Some neutral text."],
        capability=f"{bench_file}",
        capability_limit=5,
        progress=False,
    )
    out = evaluate(args, lm=tiny_lm)
    rows = out["capability"]["bench"]
    assert set(rows) == {"unsteered", "-m", "+m"} and rows["+m"]["n"] == 5
    dataset = load_benchmark(bench_file, limit=5)
    prompts = prepare_benchmark(tiny_lm, dataset)
    vector = SteeringVector.load(tmp_path / "vec")
    with vector.apply(tiny_lm, layer=1, multiplier=-3.0, positions=Positions.parse("all")):
        expected = capability(tiny_lm, prompts).summary()
    assert rows["-m"]["accuracy"] == expected["accuracy"]
    assert rows["-m"]["mean_p_correct"] == pytest.approx(expected["mean_p_correct"])


def test_evaluate_refuses_a_bad_capability_before_loading_the_model(tmp_path, capsys):
    SteeringVector({1: torch.ones(32)}).save(tmp_path / "vec")
    argv = ["-q", "evaluate", "--model", "no-such-model-xyz/abc", "--vector", str(tmp_path / "vec")]
    argv += ["--multiplier", "1", "--data", "builtin:sentiment-prompts", "--capability", "nope"]
    assert main(argv) == 2
    assert "--capability: 'nope' is neither mmlu nor truthfulqa nor a file" in capsys.readouterr().err
