"""Influence queries: `query_batch` takes one query or lists of them and refuses empty parts; query files
are checked line by line; the Python API snippet of docs/influence.md runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer
from steerlab.data.errors import DataFormatError
from steerlab.influence.data import QueryError, query_batch
from steerlab.influence.queries import read_queries, same_queries, tokenize_queries

DOCS = Path(__file__).resolve().parents[1] / "docs" / "influence.md"


def test_query_batch_of_one_query_equals_a_list_of_one():
    one = query_batch([5, 6, 7], [8, 9])
    listed = query_batch([[5, 6, 7]], [[8, 9]])
    tensors = query_batch(torch.tensor([5, 6, 7]), torch.tensor([8, 9]))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(one[key], listed[key]) and torch.equal(one[key], tensors[key])
    assert one["labels"].tolist() == [[-100, -100, -100, 8, 9]]


def test_query_batch_of_several_queries_pads_and_masks():
    batch = query_batch([[5, 6], [7]], [[8], [9, 10]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 8], [7, 9, 10]]
    assert batch["labels"].tolist() == [[-100, -100, 8], [-100, 9, 10]]


@pytest.mark.parametrize(
    ("prompts", "completions", "message"),
    [
        (5, 6, "prompts must be token ids"),
        ("the", [6], "prompts must be token ids"),
        ([5, 6], [], "completions is empty"),
        ([[5], []], [[1], [2]], "query 1 has an empty prompt"),
        ([[5], [6]], [[1], []], "query 1 has an empty completion"),
        ([5, 6], [[1], [2]], "1 prompts but 2 completions"),
        ([5.0, 6.0], [1], "prompts must be token ids"),
    ],
)
def test_query_batch_refuses_what_is_not_a_query(prompts, completions, message):
    with pytest.raises(QueryError, match=message):
        query_batch(prompts, completions)


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ({"prompt": "a", "completion": ""}, "line 2: field 'completion': is empty"),
        ({"prompt": "  ", "completion": "b"}, "line 2: field 'prompt': is empty"),
        ({"prompt": "a"}, "line 2: field 'completion': missing"),
        ({"prompt_ids": [3], "completion_ids": []}, "line 2: field 'completion_ids': is empty"),
        ({"prompt_ids": [3], "completion_ids": ["x"]}, "line 2: field 'completion_ids': expected a list"),
        ('{"prompt": ', "line 2: invalid JSON"),
    ],
)
def test_query_file_errors_name_line_and_field(tmp_path, line, where):
    path = _write(tmp_path / "q.jsonl", [{"prompt": "a", "completion": "b"}, line])
    with pytest.raises(DataFormatError, match=re.escape(f"q.jsonl: {where}")):
        read_queries(path)


def test_query_file_rows_are_tokenised_and_compared(tmp_path):
    path = _write(
        tmp_path / "q.jsonl",
        [{"prompt": "ab", "completion": "c"}, "", {"prompt_ids": [5], "completion_ids": [6, 7]}],
    )
    rows = read_queries(path)
    assert [r["line"] for r in rows] == [1, 3]
    tokenized = tokenize_queries(path, rows, char_tokenizer())
    tok = char_tokenizer()
    assert tokenized[0]["prompt_ids"] == tok("ab", add_special_tokens=False)["input_ids"]
    assert tokenized[1]["prompt"] == tok.decode([5])
    assert same_queries(rows, tokenized)
    assert not same_queries(rows[:1], tokenized) and not same_queries([rows[1], rows[0]], tokenized)


def _snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    return next(b for b in blocks if "query_batch(prompt_ids, completion_ids)" in b)


def test_docs_api_snippet_runs_with_a_tiny_model(tmp_path, monkeypatch, tiny_lm):
    """The documented calls, with the embedded model swapped for a tiny one (its layers 2-3)."""
    code = _snippet()
    assert 'load_model("smollm2-135m")' in code and "range(24, 30)" in code
    code = code.replace('load_model("smollm2-135m")', "tiny_lm").replace("range(24, 30)", "range(2, 4)")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("The capital of France is Paris. " * 200)
    namespace = {"tiny_lm": tiny_lm}
    exec(compile(code, str(DOCS), "exec"), namespace)
    assert namespace["out"]["scores"].shape == (1, 16)
    assert torch.isfinite(namespace["out"]["scores"]).all() and namespace["out"]["scores"].abs().sum() > 0
