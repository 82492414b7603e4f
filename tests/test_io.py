"""steerlab.io: result files whose halves are missing or corrupt are errors naming the file."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import pytest
import torch

from steerlab.data.errors import DataFormatError, parse_json
from steerlab.io import (
    ResultFileError,
    load_record,
    load_result,
    load_tensors,
    read_json,
    save_record,
    save_result,
    save_tensors,
)


def _corrupt_header_json(path) -> None:
    """Replace the header's metadata with text that is not JSON, keeping the file a valid safetensors."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["json"] = "{not json"
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def test_load_tensors_round_trip(tmp_path):
    save_tensors(tmp_path / "t.safetensors", {"x": torch.arange(3.0)}, {"a": 1})
    tensors, meta = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(tensors["x"], torch.arange(3.0)) and meta == {"a": 1}


def test_corrupt_header_metadata_names_the_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"x": torch.ones(2)}, {"a": 1})
    _corrupt_header_json(path)
    with pytest.raises(ResultFileError) as info:
        load_tensors(path)
    assert str(path) in str(info.value) and "not valid JSON" in str(info.value)


def test_missing_json_half_is_an_error_naming_it(tmp_path):
    tensor_path = save_result(tmp_path / "r", {"x": torch.ones(2)}, {"k": 1}, kind="Test")
    assert load_result(tmp_path / "r", "Test")[1] == {"k": 1}
    (tmp_path / "r.json").unlink()
    with pytest.raises(ResultFileError) as info:
        load_result(tensor_path, "Test")
    assert str(tmp_path / "r.json") in str(info.value) and "no such file" in str(info.value)
    tensors, meta = load_result(tensor_path, "Test", require_metadata=False)
    assert meta == {} and torch.equal(tensors["x"], torch.ones(2))


def test_json_readers_share_one_message(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(ResultFileError) as result_error:
        read_json(path)
    with pytest.raises(DataFormatError) as data_error:
        parse_json(path, path.read_text())
    assert str(result_error.value) == str(data_error.value)
    assert str(data_error.value).startswith(f"{path}: line 3: invalid JSON at column 3")


@dataclass
class _Record:
    weights: dict
    steps: int
    losses: list = field(default_factory=list)


def test_a_dataclass_record_round_trips_with_its_tensors_apart(tmp_path):
    record = _Record({"w": torch.arange(3.0)}, steps=4, losses=[1.5, 0.5])
    path = save_record(record, tmp_path / "r", "Toy", tensors="weights")
    tensors, meta = load_result(path, "Toy")
    assert set(tensors) == {"w"} and meta["steps"] == 4 and "weights" not in meta
    back = load_record(_Record, path, "Toy", tensors="weights")
    assert back.steps == 4 and back.losses == [1.5, 0.5] and torch.equal(back.weights["w"], torch.arange(3.0))
    with pytest.raises(ResultFileError, match="not a steerlab.Other"):
        load_record(_Record, path, "Other", tensors="weights")
