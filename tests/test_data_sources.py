import json

import pytest

from steerlab.data import ABDataset, DataFormatError, PairedTexts, PromptSet, load_builtin
from steerlab.data.sources import (
    SPLIT_FRACTIONS,
    SPLITS,
    DataRef,
    load_dataset,
    load_texts,
    load_word_lists,
    select,
)
from steerlab.errors import UserError

AB = {
    "question": "Q?\n\nChoices:\n (A) x\n (B) y",
    "answer_matching_behavior": "(A)",
    "answer_not_matching_behavior": "(B)",
}


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [
        ("caa.json", json.dumps([AB, AB]), ABDataset),
        ("anthropic.jsonl", "\n".join(json.dumps(AB) for _ in range(2)), ABDataset),
        ("pairs.json", json.dumps({"positive": ["a b", "c"], "negative": ["d", "e f"]}), PairedTexts),
        ("pairs.jsonl", json.dumps({"positive": "a", "negative": "b"}), PairedTexts),
        ("prompts.json", json.dumps(["one", "two"]), PromptSet),
        ("prompts.jsonl", json.dumps({"prompt": "one"}), PromptSet),
        ("prompts.txt", "one\n\ntwo\n", PromptSet),
    ],
)
def test_format_is_detected_from_the_content(tmp_path, name, text, kind):
    path = tmp_path / name
    path.write_text(text)
    assert isinstance(load_dataset(str(path)), kind)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'[\n  {"question": "Q",\n   "answer_matching_behavior": }\n]', r"bad\.json: line 3: invalid JSON"),
        (b"", r"bad\.json: the file is empty"),
        (b"  \n", r"bad\.json: the file is empty"),
        (b'[\n"caf\xe9"]', r"bad\.json: line 2: not UTF-8 text \(invalid continuation byte at byte 6\)"),
    ],
)
def test_malformed_files_name_the_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=expected):
        load_dataset(str(path))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(AB) + "\n{oops\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl: line 2: invalid JSON"):
        load_dataset(str(path))


def test_wrong_kind_and_unknown_names_are_user_errors(tmp_path):
    with pytest.raises(
        UserError, match=r"--data: builtin:sentiment holds paired texts; evaluate needs A/B items or prompts"
    ):
        load_dataset("builtin:sentiment", (ABDataset, PromptSet), "--data", "evaluate")
    with pytest.raises(UserError, match=r"--data: no built-in dataset 'nope'; available: sentiment"):
        load_dataset("builtin:nope")
    with pytest.raises(UserError, match=r"--data: no such file: .*missing\.json"):
        load_dataset(str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match=r"no CAA behaviour 'nope'"):
        load_dataset("caa:nope")
    with pytest.raises(UserError, match=r"holds word lists"):
        load_dataset("builtin:sentiment-words")


def test_named_splits_are_disjoint_seeded_parts_and_limit_takes_the_first_items():
    pairs = load_builtin("sentiment")
    parts = {name: select(pairs, name) for name in SPLITS}
    assert [len(p) for p in parts.values()] == [round(len(pairs) * f) for f in SPLIT_FRACTIONS]
    seen = [set(p.positive) for p in parts.values()]
    assert set.union(*seen) == set(pairs.positive) and sum(len(s) for s in seen) == len(pairs)
    assert select(pairs, "train").positive == parts["train"].positive  # seeded: the same every time
    assert select(pairs, "train", limit=3).positive == parts["train"].positive[:3]
    assert load_dataset(DataRef("builtin:sentiment", "test", 2)).positive == parts["test"].positive[:2]
    with pytest.raises(UserError, match="--split: 'dev' is not one of train, validation, test"):
        select(pairs, "dev")
    with pytest.raises(UserError, match="--limit: must be at least 1, got 0"):
        select(pairs, limit=0)


def test_word_lists_are_validated(tmp_path):
    assert load_word_lists("builtin:sentiment-words") == load_builtin("sentiment-words")
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"positive": ["I had a great day."], "negative": ["I had a bad day."]}))
    with pytest.raises(DataFormatError, match=r"pairs\.json: field 'positive\[0\]': expected a single word"):
        load_word_lists(pairs)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"good": ["great"], "bad": ["awful"]}))
    with pytest.raises(
        DataFormatError, match=r"other\.json: field 'positive': missing \(the object has \['bad', 'good'\]\)"
    ):
        load_word_lists(other)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"positive": [], "negative": ["awful"]}))
    with pytest.raises(DataFormatError, match=r"empty\.json: field 'positive': expected a non-empty list"):
        load_word_lists(empty)
    with pytest.raises(UserError, match=r"--words: no such file"):
        load_word_lists(tmp_path / "missing.json")


def test_texts_from_a_file_or_builtin(tmp_path):
    path = tmp_path / "neutral.txt"
    path.write_text("The sky is blue.\n\nWater is wet.\n")
    assert load_texts(path) == ["The sky is blue.", "Water is wet."]
    assert load_texts("builtin:neutral-text") == load_builtin("neutral-text")
    with pytest.raises(UserError, match="--neutral: builtin:sentiment holds paired texts, not texts"):
        load_texts("builtin:sentiment")
