"""`steerlab actadd` on a tiny model, its bad inputs, and ActAdd on the embedded SmolLM2 (slow)."""

import json

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.cli import main
from steerlab.steering import ActAddVector, extract_actadd, generate_actadd


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_actadd_extracts_saves_generates_and_reloads(tiny_folder, tmp_path, capsys):
    vec = tmp_path / "vectors" / "ab"
    common = ["--model", str(tiny_folder), "--prompt", "hello there", "--max-new-tokens", "4"]
    args = ["actadd", "--positive", "ab", "--negative", " ", "--layer", "1", "--coefficient", "-4"]
    assert main([*args, *common, "--out", str(vec)]) == 0
    out = capsys.readouterr().out
    assert "ActAdd at layer 1: 2 position(s)" in out and "--- steered:\nhello there" in out
    meta = json.loads(vec.with_suffix(".json").read_text())
    assert meta["method"] == "actadd" and meta["layer"] == 1 and meta["positive"] == "ab"
    assert meta["format"] == "steerlab.ActAddVector"
    saved = ActAddVector.load(vec)
    assert main(["actadd", "--vector", str(vec), "--coefficient", "-4", *common]) == 0
    again = capsys.readouterr().out
    assert again.split("### ")[1] == out.split("### ")[1]  # the saved vector steers the same way
    assert saved.block.shape == (2, 32)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--positive", ""], "--positive: empty text encodes to no token"),
        (["--positive", "ab", "--negative", ""], "--negative: empty text"),
        ([], "--positive: give a prompt pair"),
        (["--positive", "ab", "--vector", "v"], "--positive: give a prompt pair"),
        (["--positive", "ab", "--coefficient", "nan"], "--coefficient: nan"),
        (["--vector", "missing"], "--vector: "),
    ],
)
def test_actadd_bad_inputs_before_loading_the_model(tmp_path, capsys, extra, message):
    args = ["actadd", "--model", str(tmp_path / "no-such-model"), "--prompt", "hi", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_actadd_short_prompt_names_the_prompt(tiny_folder, capsys):
    args = ["actadd", "--model", str(tiny_folder), "--positive", "abcdef", "--layer", "1", "--prompt", "hi"]
    assert main(args) == 2
    assert "prompt 1 'hi' has 2 tokens but the ActAdd block covers 6 positions" in capsys.readouterr().err
    assert main([*args, "--truncate", "--max-new-tokens", "2"]) == 0


@pytest.mark.slow
def test_weddings_on_smollm2_cached_equals_uncached(smollm2):
    vector = extract_actadd(smollm2, " weddings", " ", layer=6)
    assert vector.positions == 1 and vector.metadata["sink"]["token"] == "<|endoftext|>"
    prompts = ["I went up to my friend and said", "Barack Obama was born in"]
    kwargs = dict(max_new_tokens=6, batch_size=2)
    cached = generate_actadd(smollm2, prompts, vector, 4.0, **kwargs)
    uncached = generate_actadd(smollm2, prompts, vector, 4.0, use_cache=False, **kwargs)
    assert cached == uncached
    assert cached != generate_actadd(smollm2, prompts, None, **kwargs)
