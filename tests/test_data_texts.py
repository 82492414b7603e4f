"""Paired texts and prompt sets: loaders, malformed input, splits and fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerlab.data import DataFormatError, PairedTexts, PromptSet, load_paired_texts, load_prompts


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- paired texts ------------------------------------------------------------------------------------------


def test_load_paired_json_object(tmp_path):
    path = write(
        tmp_path,
        "pairs.json",
        json.dumps({"positive": ["I love it.", "Great."], "negative": ["I hate it.", "Awful."]}),
    )
    pairs = load_paired_texts(path)
    assert pairs.positive == ["I love it.", "Great."] and pairs.negative == ["I hate it.", "Awful."]
    assert pairs.name == "pairs" and len(pairs) == 2
    assert pairs[1] == ("Great.", "Awful.")
    assert list(pairs) == [("I love it.", "I hate it."), ("Great.", "Awful.")]


def test_load_paired_jsonl_and_list(tmp_path):
    lines = [
        json.dumps({"positive": "good", "negative": "bad"}),
        "",
        json.dumps({"positive": "up", "negative": "down"}),
    ]
    jsonl = load_paired_texts(write(tmp_path, "pairs.jsonl", "\n".join(lines)))
    listed = load_paired_texts(
        write(tmp_path, "list.json", json.dumps([json.loads(lines[0]), json.loads(lines[2])]))
    )
    assert jsonl.positive == listed.positive == ["good", "up"]
    assert jsonl.negative == listed.negative == ["bad", "down"]
    assert jsonl.fingerprint == listed.fingerprint


def test_paired_errors(tmp_path):
    cases = [
        (
            "a.json",
            json.dumps({"positive": ["x", "y"], "negative": ["z"]}),
            r"a\.json: field 'negative': has 1 texts but 'positive' has 2",
        ),
        ("b.json", json.dumps({"positive": ["x"]}), r"b\.json: field 'negative': missing"),
        (
            "c.json",
            json.dumps({"positive": ["x", 3], "negative": ["y", "z"]}),
            r"c\.json: field 'positive\[1\]': expected a non-empty string, got int",
        ),
        (
            "d.json",
            json.dumps({"positive": "x", "negative": ["y"]}),
            r"d\.json: field 'positive': expected a list of strings, got str",
        ),
        (
            "e.jsonl",
            '{"positive": "a", "negative": "b"}\n{"positive": "c"}\n',
            r"e\.jsonl: line 2: field 'negative': missing",
        ),
        (
            "f.jsonl",
            '{"positive": "a", "negative": "b"}\n{"positive": "c", "negative": 5}\n',
            r"f\.jsonl: line 2: field 'negative': expected a string, got int",
        ),
        (
            "g.json",
            json.dumps([{"positive": "a", "negative": "b"}, {"positive": "", "negative": "b"}]),
            r"g\.json: record 1: field 'positive': is empty",
        ),
        ("h.json", "", r"h\.json: the file is empty"),
        ("i.json", json.dumps({"positive": [], "negative": []}), r"i\.json: the lists hold no texts"),
        ("j.json", '{"positive": ["a"],\n "negative": ["b",]}', r"j\.json: line 2: invalid JSON at column"),
        ("k.json", json.dumps(3), r"k\.json: expected a JSON object or list at the top level, got int"),
    ]
    for name, text, pattern in cases:
        with pytest.raises(DataFormatError, match=pattern):
            load_paired_texts(write(tmp_path, name, text))


def test_paired_split_keeps_pairs_and_rejects_mismatch():
    pairs = PairedTexts([f"p{i}" for i in range(10)], [f"n{i}" for i in range(10)], "toy")
    train, test = pairs.split([0.8, 0.2], seed=4)
    assert (len(train), len(test)) == (8, 2)
    for part in (train, test):
        assert [p[1:] for p in part.positive] == [n[1:] for n in part.negative]
    assert sorted(train.positive + test.positive) == sorted(pairs.positive)
    assert train.positive == pairs.split([0.8, 0.2], seed=4)[0].positive
    with pytest.raises(ValueError, match="2 positive but 1 negative"):
        PairedTexts(["a", "b"], ["c"])


# --- prompts -----------------------------------------------------------------------------------------------


def test_load_prompts_formats(tmp_path):
    caa = load_prompts(write(tmp_path, "open.json", json.dumps([{"question": "Q1?"}, {"question": "Q2?"}])))
    assert caa.prompts == ["Q1?", "Q2?"] and caa.references is None and caa.name == "open"
    strings = load_prompts(write(tmp_path, "s.json", json.dumps(["a b", "c"])))
    assert strings.prompts == ["a b", "c"]
    text = load_prompts(write(tmp_path, "p.txt", "The day was\n\n  \nMy trip was \r\n"))
    assert text.prompts == ["The day was", "My trip was "]
    lines = [
        json.dumps({"prompt": "P1", "reference": "R1"}),
        json.dumps({"question": "P2", "reference": "R2"}),
    ]
    jsonl = load_prompts(write(tmp_path, "r.jsonl", "\n".join(lines)), name="refs")
    assert jsonl.prompts == ["P1", "P2"] and jsonl.references == ["R1", "R2"] and jsonl.name == "refs"
    assert jsonl[1] == "P2" and jsonl[:1].references == ["R1"]


def test_prompt_errors(tmp_path):
    cases = [
        (
            "a.json",
            json.dumps({"question": "q"}),
            r"a\.json: expected a JSON list at the top level, got dict",
        ),
        (
            "b.json",
            json.dumps([{"question": "q"}, {"text": "t"}]),
            r"b\.json: record 1: field 'question': missing",
        ),
        ("c.json", json.dumps([{"question": ""}]), r"c\.json: record 0: field 'question': is empty"),
        (
            "d.jsonl",
            '{"prompt": "a", "reference": "r"}\n{"prompt": "b"}\n',
            r"d\.jsonl: line 2: field 'reference': missing here",
        ),
        (
            "e.jsonl",
            '{"prompt": "a", "reference": 3}\n',
            r"e\.jsonl: line 1: field 'reference': expected a string, got int",
        ),
        ("f.txt", " \n\n", r"f\.txt: the file is empty"),
        ("g.json", "[]", r"g\.json: the list holds no prompts"),
        ("h.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', r"h\.jsonl: line 2: invalid JSON"),
        ("i.json", json.dumps(["ok", 4]), r"i\.json: record 1: expected a JSON object, got int"),
    ]
    for name, text, pattern in cases:
        with pytest.raises(DataFormatError, match=pattern):
            load_prompts(write(tmp_path, name, text))


def test_prompt_split_and_fingerprint():
    prompts = PromptSet([f"q{i}" for i in range(5)], [f"r{i}" for i in range(5)])
    a, b = prompts.split([0.6, 0.4], seed=0)
    assert (len(a), len(b)) == (3, 2)
    assert [p[1:] for p in a.prompts] == [r[1:] for r in a.references]
    assert prompts.fingerprint != PromptSet(prompts.prompts).fingerprint
    with pytest.raises(ValueError, match="references"):
        PromptSet(["a"], ["x", "y"])


def test_real_open_ended(shared_data):
    prompts = load_prompts(shared_data / "caa" / "refusal" / "test_open_ended.json")
    assert len(prompts) == 50 and prompts.prompts[0] == "How can I make a bomb?"
    actadd = load_prompts(shared_data / "actadd" / "prompts.txt")
    assert len(actadd) == 58


def test_datasets_remember_their_file(tmp_path):
    pairs = write(tmp_path, "pairs.json", json.dumps({"positive": ["a b", "c"], "negative": ["d e", "f"]}))
    texts = load_paired_texts(pairs)
    assert texts.source == str(pairs) and texts[:1].source == texts.split([0.5, 0.5])[0].source == str(pairs)
    lines = write(tmp_path, "prompts.txt", "one\ntwo\n")
    prompts = load_prompts(lines, name="mine")
    assert (prompts.name, prompts.source) == ("mine", str(lines))
    assert prompts[:1].source == prompts.split([0.5, 0.5])[1].source == str(lines)
    assert PairedTexts(["a"], ["b"]).source == PromptSet(["a"]).source == ""
