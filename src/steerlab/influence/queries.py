"""Influence queries from a JSONL file: one {"prompt", "completion"} (text) or {"prompt_ids",
"completion_ids"} (token ids) per line. A query whose prompt or completion is empty is refused (its
completion would carry no loss, and every score would be zero)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steerlab.data.errors import DataFormatError, get_str, read_jsonl
from steerlab.influence.data import query_batch

__all__ = ["query_batches", "read_queries", "same_queries", "tokenize_queries"]


def _ids(path: Path, obj: dict, key: str, line: int) -> list[int]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise DataFormatError(path, "expected a list of token ids (integers)", line=line, field=key)
    if not value:
        raise DataFormatError(path, "is empty", line=line, field=key)
    return value


def read_queries(path: str | Path) -> list[dict[str, Any]]:
    """The queries of a JSONL file, checked but not tokenised: each row has `prompt` and `completion`
    (non-empty text) or `prompt_ids` and `completion_ids` (non-empty id lists). Errors name the line
    and field."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "no such query file")
    rows = []
    for line, obj in read_jsonl(path):
        if isinstance(obj, dict) and ("prompt_ids" in obj or "completion_ids" in obj):
            row = {key: _ids(path, obj, key, line) for key in ("prompt_ids", "completion_ids")}
        else:
            row = {key: get_str(path, obj, key, {"line": line}) for key in ("prompt", "completion")}
        rows.append({"line": line, **row})
    if not rows:
        raise DataFormatError(path, "holds no queries")
    return rows


def tokenize_queries(path: str | Path, rows: list[dict], tokenizer) -> list[dict[str, Any]]:
    """Rows with `prompt`, `completion` (text) and `prompt_ids`, `completion_ids` (token ids)."""
    out = []
    for row in rows:
        row = dict(row)
        for key in ("prompt", "completion"):
            if f"{key}_ids" not in row:
                row[f"{key}_ids"] = tokenizer(row[key], add_special_tokens=False)["input_ids"]
                if not row[f"{key}_ids"]:
                    raise DataFormatError(path, "gives no tokens", line=row["line"], field=key)
            row.setdefault(key, tokenizer.decode(row[f"{key}_ids"]))
        out.append(row)
    return out


def same_queries(requested: list[dict], saved: list[dict]) -> bool:
    """Whether the rows read from a query file are the queries of a saved (tokenised) list."""
    if len(requested) != len(saved):
        return False
    keys = ("prompt", "completion", "prompt_ids", "completion_ids")
    return all(all(r[k] == s.get(k) for k in keys if k in r) for r, s in zip(requested, saved))


def query_batches(rows: list[dict], pad_id: int, size: int = 8) -> list[dict]:
    """`query_batch`es of `size` tokenised rows (loss on the completion tokens only)."""
    return [
        query_batch(
            [r["prompt_ids"] for r in rows[i : i + size]],
            [r["completion_ids"] for r in rows[i : i + size]],
            pad_id,
        )
        for i in range(0, len(rows), size)
    ]
