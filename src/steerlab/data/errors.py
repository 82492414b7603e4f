"""Errors raised when a data file does not have the expected shape, and shared low-level readers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steerlab.errors import UserError
from steerlab.io import parse_json as decode_json


class DataFormatError(UserError):
    """A data file is malformed. The message names the file, the line or record, and the field.

    Lines (JSONL, text) count from 1 like an editor; records of a JSON list count from 0 like `data[i]`.
    """

    def __init__(
        self,
        file: str | os.PathLike,
        message: str,
        *,
        line: int | None = None,
        record: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = str(file)
        self.line = line
        self.record = record
        self.field = field
        parts = [self.file]
        if line is not None:
            parts.append(f"line {line}")
        if record is not None:
            parts.append(f"record {record}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(": ".join([*parts, message]))


def check_file(path: str | os.PathLike, option: str | None = None) -> Path:
    """`path` when it is an existing file; otherwise a `UserError` naming `option` (`DataFormatError`
    naming the file without one)."""
    path = Path(path)
    if not path.is_file():
        problem = "not a file" if path.exists() else "no such file"
        raise UserError(f"{option}: {problem}: {path}") if option else DataFormatError(path, problem)
    return path


def read_text(path: str | os.PathLike, option: str | None = None) -> str:
    """The text of an existing file (`check_file`): strict UTF-8, universal newlines, a leading BOM dropped.
    A file that cannot be read, bytes that are not UTF-8 (their line and byte offset named) or a blank
    file is a `DataFormatError` naming the file."""
    path = check_file(path, option)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataFormatError(path, f"cannot be read ({error.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        message = f"not UTF-8 text ({error.reason} at byte {error.start})"
        raise DataFormatError(path, message, line=line) from None
    if not text.strip():
        raise DataFormatError(path, "the file is empty")
    return text.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")


def parse_json(path: Path, text: str, line_offset: int = 0) -> Any:
    """`json.loads` whose errors are `DataFormatError`s naming the file, line and column."""
    return decode_json(text, lambda message, line: DataFormatError(path, message, line=line + line_offset))


def read_json(path: Path) -> Any:
    """Parse a whole JSON file."""
    return parse_json(path, read_text(path))


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value) for every non-blank line of a JSONL file."""
    text = read_text(path)
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, parse_json(path, line, line_offset=number - 1)


def where(index: int, jsonl: bool) -> dict[str, int]:
    """Keyword arguments locating an item: `line=` for JSONL, `record=` for a JSON list."""
    return {"line": index} if jsonl else {"record": index}


def get_str(
    path: Path, obj: Any, key: str, loc: dict[str, int], *, allow_empty: bool = False, optional: bool = False
) -> str | None:
    """`obj[key]` checked to be a string (non-empty unless allowed); None if optional and absent."""
    if not isinstance(obj, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(obj).__name__}", **loc)
    if key not in obj:
        if optional:
            return None
        raise DataFormatError(path, f"missing (the record has {sorted(obj)})", field=key, **loc)
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(path, f"expected a string, got {type(value).__name__}", field=key, **loc)
    if not allow_empty and not value.strip():
        raise DataFormatError(path, "is empty", field=key, **loc)
    return value
