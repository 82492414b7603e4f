"""A/B items: loaders, validation errors, option parsing, splits, fingerprints and letter balancing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from steerlab.data import (
    ABDataset,
    ABItem,
    DataFormatError,
    load_ab,
    load_anthropic_jsonl,
    load_caa_json,
    normalise_label,
    parse_options,
)

Q_AB = "Do you like tea?\n\nChoices:\n (A) Yes, a lot\n (B) No, never"


def record(question: str = Q_AB, matching: object = "(A)", not_matching: object = "(B)") -> dict:
    return {
        "question": question,
        "answer_matching_behavior": matching,
        "answer_not_matching_behavior": not_matching,
    }


def write_json(tmp_path: Path, data: object, name: str = "caa.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(tmp_path: Path, lines: list[str], name: str = "evals.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ab_item(first: str, second: str, matching: str = "(A)") -> ABItem:
    question = f"Pick one.\n\nChoices:\n (A) {first}\n (B) {second}"
    return ABItem(question, matching, "(B)" if matching == "(A)" else "(A)")


# --- parsing -----------------------------------------------------------------------------------------------


def test_normalise_label():
    assert normalise_label("(A)") == "(A)"
    assert normalise_label(" (H)") == "(H)"
    assert normalise_label("A)") is None
    assert normalise_label("(a)") is None
    assert normalise_label("(AB)") is None


def test_parse_options_formats():
    assert parse_options(Q_AB) == ("(A)", "(B)")
    assert parse_options("Q?\n\nChoices:\n(A) x\n(B) y\n(C) z") == ("(A)", "(B)", "(C)")
    assert parse_options("Q?\n\nChoices:\n (A)No\n (B) Yes") == ("(A)", "(B)")  # real CAA data: no space
    # lines in the stem before "Choices:" are not options
    assert parse_options("(C) is a label.\n\nChoices:\n (A) x\n (B) y") == ("(A)", "(B)")
    assert parse_options("No choices here") == ()


def test_option_text_multiline_and_answer_suffix():
    question = "Q?\n\nChoices:\n (A) first line\n   still A\n (B) the b text  \n\nAnswer:"
    item = ABItem(question, "(B)", "(A)")
    assert item.option_text("(A)") == "first line\n   still A"
    assert item.option_text("(B)") == "the b text"
    assert item.options == ("(A)", "(B)")


def test_item_options_fallback_and_validation():
    assert ABItem("Yes or no?", "(B)", "(A)").options == ("(A)", "(B)")
    with pytest.raises(ValueError, match="matching"):
        ABItem("q", "A", "(B)")
    with pytest.raises(ValueError, match="both"):
        ABItem("q", "(A)", "(A)")


# --- loaders -----------------------------------------------------------------------------------------------


def test_load_caa_json(tmp_path):
    eight = "Q?\n\nChoices:\n" + "\n".join(f" ({c}) option {c}" for c in "ABCDEFGH")
    path = write_json(tmp_path, [record(), record(Q_AB, "(B)", "(A)"), record(eight, "(H)", "(C)")])
    data = load_caa_json(path)
    assert len(data) == 3
    assert data[0] == ABItem(Q_AB, "(A)", "(B)", ("(A)", "(B)"), "caa.json#record 0")
    assert (data[1].matching, data[1].not_matching) == ("(B)", "(A)")
    assert data[2].options == tuple(f"({c})" for c in "ABCDEFGH")
    assert data[2].source == "caa.json#record 2"
    assert data.letter_counts() == {"(A)": 1, "(B)": 1, "(C)": 0, "(H)": 1}


def test_load_anthropic_jsonl_strips_leading_space(tmp_path):
    lines = [json.dumps(record(matching=" (B)", not_matching=" (A)")), "", json.dumps(record())]
    data = load_anthropic_jsonl(write_jsonl(tmp_path, lines))
    assert [(i.matching, i.not_matching) for i in data] == [("(B)", "(A)"), ("(A)", "(B)")]
    assert [i.source for i in data] == ["evals.jsonl:1", "evals.jsonl:3"]


def test_load_ab_dispatch_and_custom_fields(tmp_path):
    assert len(load_ab(write_json(tmp_path, [record()]))) == 1
    assert len(load_ab(write_jsonl(tmp_path, [json.dumps(record())]))) == 1
    mmlu = [{"prompt": Q_AB, "correct": "(B)", "incorrect": "(A)"}]
    data = load_ab(
        write_json(tmp_path, mmlu, "mmlu.json"),
        question="prompt",
        matching="correct",
        not_matching="incorrect",
    )
    assert data[0].matching == "(B)"
    with pytest.raises(DataFormatError, match=r"data\.csv: unknown A/B file type"):
        load_ab(tmp_path / "data.csv")


# --- malformed input ---------------------------------------------------------------------------------------


def check(path: Path, pattern: str) -> None:
    with pytest.raises(DataFormatError, match=pattern):
        load_ab(path)


def test_error_unreadable_json(tmp_path):
    path = tmp_path / "caa.json"
    path.write_text('[\n  {"question": "q",\n  "answer_matching_behavior" "(A)"}\n]')
    check(path, r"caa\.json: line 3: invalid JSON at column \d+")


def test_error_unreadable_jsonl_line(tmp_path):
    path = write_jsonl(tmp_path, [json.dumps(record()), json.dumps(record()), '{"question": "q",'])
    check(path, r"evals\.jsonl: line 3: invalid JSON at column \d+")


def test_error_top_level_not_a_list(tmp_path):
    check(
        write_json(tmp_path, {"question": "q"}),
        r"caa\.json: expected a JSON list of records at the top level, got dict",
    )


def test_error_record_not_an_object(tmp_path):
    check(write_json(tmp_path, [record(), "oops"]), r"caa\.json: record 1: expected a JSON object, got str")
    check(
        write_jsonl(tmp_path, [json.dumps(record()), "[1, 2]"]),
        r"evals\.jsonl: line 2: expected a JSON object, got list",
    )


def test_error_missing_field(tmp_path):
    bad = record()
    del bad["answer_not_matching_behavior"]
    check(
        write_json(tmp_path, [record(), record(), bad]),
        r"caa\.json: record 2: field 'answer_not_matching_behavior': missing",
    )
    check(
        write_jsonl(tmp_path, [json.dumps({"prompt": "x"})]),
        r"evals\.jsonl: line 1: field 'question': missing",
    )


def test_error_field_wrong_type(tmp_path):
    check(
        write_json(tmp_path, [record(matching=["(A)"])]),
        r"caa\.json: record 0: field 'answer_matching_behavior': expected a string, got list",
    )
    check(
        write_json(tmp_path, [record(question=7)]),
        r"caa\.json: record 0: field 'question': expected a string, got int",
    )


def test_error_bad_label(tmp_path):
    pattern = r"caa\.json: record 3: field 'answer_matching_behavior': expected an answer label like \"\(A\)\", got 'A\)'"
    check(write_json(tmp_path, [record()] * 3 + [record(matching="A)")]), pattern)
    check(
        write_jsonl(tmp_path, [json.dumps(record(not_matching=" B"))]),
        r"evals\.jsonl: line 1: field 'answer_not_matching_behavior': expected an answer label",
    )


def test_error_matching_equals_not_matching(tmp_path):
    check(
        write_json(tmp_path, [record(not_matching="(A)")]),
        r"caa\.json: record 0: field 'answer_not_matching_behavior': is the same label",
    )


def test_error_letter_not_offered(tmp_path):
    pattern = r"caa\.json: record 1: field 'answer_matching_behavior': \(C\) is not among the choices in the question \(\(A\), \(B\)\)"
    check(write_json(tmp_path, [record(), record(matching="(C)")]), pattern)


def test_error_empty_question(tmp_path):
    check(write_json(tmp_path, [record(question="  ")]), r"caa\.json: record 0: field 'question': is empty")


def test_error_empty_file_and_empty_list(tmp_path):
    (tmp_path / "caa.json").write_text("\n")
    check(tmp_path / "caa.json", r"caa\.json: the file is empty")
    (tmp_path / "evals.jsonl").write_text("")
    check(tmp_path / "evals.jsonl", r"evals\.jsonl: the file is empty")
    check(write_json(tmp_path, []), r"caa\.json: the list holds no records")


# --- dataset operations ------------------------------------------------------------------------------------


def make_dataset(n: int, a_count: int) -> ABDataset:
    items = [ab_item(f"good {i}", f"bad {i}") for i in range(a_count)]
    items += [ab_item(f"bad {i}", f"good {i}", "(B)") for i in range(a_count, n)]
    return ABDataset(items, "toy")


def test_getitem_len_iter():
    data = make_dataset(6, 3)
    assert len(data) == 6 and isinstance(data[0], ABItem)
    sub = data[1:3]
    assert isinstance(sub, ABDataset) and sub.items == data.items[1:3] and sub.name == "toy"
    assert list(data) == data.items


def test_split_deterministic_disjoint_sizes():
    data = make_dataset(10, 5)
    parts = data.split([0.7, 0.3], seed=1)
    assert [len(p) for p in parts] == [7, 3]
    questions = [i.question for p in parts for i in p]
    assert sorted(questions) == sorted(i.question for i in data)  # disjoint and complete
    again = data.split([0.7, 0.3], seed=1)
    assert [p.items for p in parts] == [p.items for p in again]
    other = data.split([0.7, 0.3], seed=2)
    assert [p.items for p in parts] != [p.items for p in other]
    assert [len(p) for p in make_dataset(7, 3).split([1 / 3, 1 / 3, 1 / 3])] == [2, 3, 2]
    with pytest.raises(ValueError, match="sum to 1"):
        data.split([0.5, 0.2])


def test_fingerprint_content_only():
    a, b = make_dataset(4, 2), make_dataset(4, 2)
    b.name = "other"
    assert a.fingerprint == b.fingerprint and re.fullmatch(r"[0-9a-f]{64}", a.fingerprint)
    assert a.fingerprint != make_dataset(4, 1).fingerprint
    assert a[:3].fingerprint != a.fingerprint


def test_swapped_keeps_answer_text():
    item = ab_item("I am happy", "I am sad")
    swapped = item.swapped()
    assert swapped.question == "Pick one.\n\nChoices:\n (A) I am sad\n (B) I am happy"
    assert (swapped.matching, swapped.not_matching) == ("(B)", "(A)")
    assert swapped.option_text(swapped.matching) == "I am happy"
    assert swapped.swapped() == item


def test_swapped_multi_option_only_touches_the_two_answers():
    question = "Q?\n\nChoices:\n (A) alpha\n (B) beta\n (C) gamma text\n\nAnswer:"
    swapped = ABItem(question, "(C)", "(A)").swapped()
    assert swapped.question == "Q?\n\nChoices:\n (A) gamma text\n (B) beta\n (C) alpha\n\nAnswer:"
    assert (swapped.matching, swapped.not_matching) == ("(A)", "(C)")


@pytest.mark.parametrize(("n", "a_count"), [(10, 9), (10, 0), (9, 2), (12, 6)])
def test_balance_letters(n, a_count):
    data = make_dataset(n, a_count)
    balanced = data.balance_letters(seed=3)
    half = n // 2
    assert len(balanced) == 2 * half
    assert balanced.letter_counts() == {"(A)": half, "(B)": half}
    before = {item.option_text(item.matching) for item in data}
    after = {item.option_text(item.matching) for item in balanced}
    assert after <= before and len(after) == len(balanced)  # every matching label still names the good text
    assert all(text.startswith("good") for text in after)
    assert balanced.fingerprint == data.balance_letters(seed=3).fingerprint  # deterministic
    if a_count == half and n % 2 == 0:
        assert balanced.items == data.items  # already balanced: untouched


def test_balance_letters_groups_label_pairs_and_drops_unswappable():
    items = [
        ABItem("Q?\n\nChoices:\n (A) a\n (B) b\n (C) c", "(C)", "(A)"),
        ABItem("Q?\n\nChoices:\n (A) a2\n (B) b2\n (C) c2", "(C)", "(A)"),
        ABItem("Answer yes or no.", "(A)", "(B)"),  # no option lines: cannot swap, dropped
        ab_item("good", "bad"),
        ab_item("good2", "bad2"),
    ]
    balanced = ABDataset(items).balance_letters()
    assert len(balanced) == 4
    assert balanced.pair_counts() == {"(A)/(B)": {"(A)": 1, "(B)": 1}, "(A)/(C)": {"(A)": 1, "(C)": 1}}
    texts = sorted(i.option_text(i.matching) for i in balanced)
    assert texts == ["c", "c2", "good", "good2"]


# --- real data ---------------------------------------------------------------------------------------------


def test_real_caa_and_anthropic_files(shared_data):
    caa = load_caa_json(shared_data / "caa" / "corrigible-neutral-HHH" / "test_ab.json")
    assert len(caa) == 50 and caa.letter_counts() == {"(A)": 22, "(B)": 28}
    assert (
        caa[0].options == ("(A)", "(B)")
        and caa[0].option_text(caa[0].matching) == "Yes, I consent to this change."
    )
    balanced = caa.balance_letters()
    assert balanced.letter_counts() == {"(A)": 25, "(B)": 25}
    evals = load_ab(shared_data / "anthropic-evals" / "corrigible-neutral-HHH.jsonl")
    assert len(evals) == 340 and evals[0].matching in ("(A)", "(B)") and evals[0].source.endswith(":1")


def test_real_survival_instinct_many_options(shared_data):
    data = load_caa_json(shared_data / "caa" / "survival-instinct" / "test_ab.json")
    assert max(len(i.options) for i in data) == 5
    balanced = data.balance_letters(seed=0)
    for counts in balanced.pair_counts().values():
        assert len(set(counts.values())) == 1
    assert len(balanced) == 48


# --- balancing that keeps nothing, and reporting what it drops ---------------------------------------------


def test_balancing_a_single_item_names_the_file_and_why(tmp_path):
    path = write_json(tmp_path, [record()])
    with pytest.raises(DataFormatError) as error:
        load_caa_json(path).balance_letters()
    message = str(error.value)
    assert message.startswith(f"{path}: balancing the answer letters keeps none of the 1 item(s)")
    assert "1 to make each group of label pairs even" in message and "--no-balance" in message


def test_balancing_items_without_choices_names_the_file_and_why(tmp_path):
    path = write_jsonl(tmp_path, [json.dumps(record(question=f"Agree? ({i})")) for i in range(4)])
    with pytest.raises(
        DataFormatError,
        match=re.escape(
            f"{path}: balancing the answer letters keeps none of the 4 item(s) (4 without both answers among their option lines"
        ),
    ):
        load_anthropic_jsonl(path).balance_letters()


def test_balancing_reports_dropped_items_as_a_warning(tmp_path, caplog):
    records = [record(), record(matching="(B)", not_matching="(A)"), record(), record(question="Agree?")]
    path = write_json(tmp_path, records)
    with caplog.at_level("WARNING", logger="steerlab.data.contrast"):
        balanced = load_caa_json(path).balance_letters()
    assert len(balanced) == 2
    [entry] = caplog.records
    assert entry.levelname == "WARNING"
    assert entry.getMessage() == (
        f"{path}: balancing the answer letters dropped 2 of 4 item(s): 1 without both answers among their "
        "option lines (like ' (A) text' after 'Choices:'), so their letters cannot be swapped; 1 to make each "
        "group of label pairs even"
    )


def test_datasets_remember_their_file_through_slicing_splits_and_balancing(tmp_path):
    path = write_json(tmp_path, [record(), record(matching="(B)", not_matching="(A)")] * 3)
    data = load_caa_json(path)
    assert data.source == str(path) and load_ab(
        write_jsonl(tmp_path, [json.dumps(record())])
    ).source.endswith("evals.jsonl")
    assert data[:2].source == data.split([0.5, 0.5])[1].source == data.balance_letters().source == str(path)
    assert ABDataset([ab_item("x", "y")]).source == ""
