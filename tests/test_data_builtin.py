"""The built-in datasets: presence as package data, types, sizes and the properties they promise."""

from __future__ import annotations

import difflib
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from steerlab.data import ABDataset, PairedTexts, PromptSet, list_builtin, load_builtin
from steerlab.organisms.data import drop_near

NAMES = [
    "sentiment",
    "sentiment-prompts",
    "sentiment-words",
    "sentiment-ab",
    "easy-ab",
    "easy-cloze",
    "neutral-text",
    "near-miss",
    "harmful-extra",
    "pirate-persona",
    "constitution",
    "distill-prompts",
    "sentiment-pool",
    "sentiment-lengths",
]


def test_listed_and_shipped_as_package_data():
    assert list(list_builtin()) == NAMES
    folder = resources.files("steerlab.data") / "builtin"
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".json")) == sorted(
        f"{n}.json" for n in NAMES
    )
    with pytest.raises(KeyError, match="available: sentiment, sentiment-prompts"):
        load_builtin("sentiments")


def test_sentiment_pairs():
    pairs = load_builtin("sentiment")
    assert isinstance(pairs, PairedTexts) and len(pairs) >= 48 and pairs.name == "sentiment"
    assert pairs[0] == (
        "I opened the letter and it was wonderful news.",
        "I opened the letter and it was terrible news.",
    )
    for positive, negative in pairs:
        assert positive != negative and positive.endswith(".") and negative.endswith(".")
        for text in (positive, negative):  # first person
            assert set(re.findall(r"[a-z]+", text.lower())) & {"i", "my", "me", "our", "we"}, text
        similarity = difflib.SequenceMatcher(a=positive.split(), b=negative.split()).ratio()
        assert similarity >= 0.5, (positive, negative)  # parallel wording
    assert len(set(pairs.positive)) == len(pairs.positive)


def test_sentiment_prompts_are_neutral():
    prompts = load_builtin("sentiment-prompts")
    words = load_builtin("sentiment-words")
    cues = set(words["positive"]) | set(words["negative"]) | {"love", "hate", "happy", "sad", "enjoyed"}
    assert isinstance(prompts, PromptSet) and len(prompts) >= 40 and prompts.references is None
    assert "The weather this weekend was" in prompts.prompts
    for prompt in prompts:
        assert not set(re.findall(r"[a-z]+", prompt.lower())) & cues, prompt
        assert not prompt.endswith((" ", "."))


def test_sentiment_words():
    words = load_builtin("sentiment-words")
    assert set(words) == {"positive", "negative"}
    assert len(words["positive"]) >= 25 and len(words["negative"]) >= 25
    assert {"great", "wonderful", "amazing", "good", "excellent"} <= set(words["positive"])
    assert {"terrible", "awful", "horrible", "bad", "boring", "disappointing"} <= set(words["negative"])
    assert not set(words["positive"]) & set(words["negative"])
    assert all(re.fullmatch(r"[a-z]+", w) for w in words["positive"] + words["negative"])


def test_sentiment_ab():
    data = load_builtin("sentiment-ab")
    assert isinstance(data, ABDataset) and len(data) >= 40
    assert data.letter_counts() == {"(A)": len(data) // 2, "(B)": len(data) // 2}
    first = data[0]
    assert first.question.startswith("Your friend asks how your weekend went.")
    assert "\n\nChoices:\n (A) " in first.question and "\n (B) " in first.question
    assert (
        first.option_text(first.matching) == "It was lovely, I spent it hiking and laughing with my family."
    )
    assert data[1].option_text(data[1].matching) == "I love it, it is bright and everyone seems happier."
    assert all(item.options == ("(A)", "(B)") for item in data)
    assert data.balance_letters().letter_counts() == data.letter_counts()


def test_easy_ab_alternates_letters():
    data = load_builtin("easy-ab")
    assert isinstance(data, ABDataset) and len(data) >= 40
    letters = [item.matching.strip() for item in data.items]
    assert letters[0::2] == ["(A)"] * len(letters[0::2]) and letters[1::2] == ["(B)"] * len(letters[1::2])


def test_neutral_text():
    texts = load_builtin("neutral-text")
    assert isinstance(texts, list) and 15 <= len(texts) <= 30
    assert all(isinstance(t, str) and t.endswith(".") for t in texts)


def test_near_miss_has_disjoint_train_val_and_test_parts():
    parts = load_builtin("near-miss")
    assert sorted(parts) == ["test", "train", "val"]
    assert len(parts["train"]) >= 50 and len(parts["val"]) >= 25 and len(parts["test"]) >= 25
    seen = [text for part in parts.values() for text in part]
    assert len(seen) == len(set(seen))
    assert all(text.endswith(("?", ".")) for part in parts.values() for text in part)
    held_out = parts["val"] + parts["test"]  # trained prompts are not near-duplicates of held-out ones
    assert drop_near(parts["train"], held_out, threshold=0.75) == parts["train"]


def test_harmful_extra_has_disjoint_train_and_val_parts():
    parts = load_builtin("harmful-extra")
    assert sorted(parts) == ["train", "val"] and len(parts["train"]) >= 90 and len(parts["val"]) >= 25
    seen = [text for part in parts.values() for text in part]
    assert len(seen) == len(set(seen))
    near_miss = {text for part in load_builtin("near-miss").values() for text in part}
    assert not near_miss & set(seen)


def test_harmful_extra_shares_no_prompt_with_the_held_out_refusal_splits():
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "redteam" / "refusal_direction"
    if not folder.is_dir():
        pytest.skip(f"the refusal splits are not at {folder}")
    held_out = {
        " ".join(item["instruction"].lower().split())
        for name in ("harmful_val.json", "harmful_test.json")
        for item in json.loads((folder / name).read_text())
    }
    ours = {" ".join(t.lower().split()) for part in load_builtin("harmful-extra").values() for t in part}
    assert not ours & held_out
    for text in ours:  # not even a near-duplicate (the shared train split itself has 44 pairs above 0.72)
        matcher = difflib.SequenceMatcher(None, text)
        for other in held_out:
            matcher.set_seq2(other)
            assert matcher.quick_ratio() < 0.8 or matcher.ratio() < 0.8, (text, other)


def test_distillation_data():
    prompts = load_builtin("distill-prompts")
    assert {k: len(v) for k, v in prompts.items()} == {"train": 24, "val": 12, "test": 24}
    every = [p for split in prompts.values() for p in split]
    assert len(set(every)) == len(every)  # disjoint splits, no duplicate
    assert "Arr!" in load_builtin("pirate-persona")
    rules = load_builtin("constitution")
    assert len(re.findall(r"^\d+\. ", rules, flags=re.MULTILINE)) == 12
