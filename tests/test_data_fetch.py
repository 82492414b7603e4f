"""The pinned CAA fetcher, exercised through a local HTTP mirror built from the shared data copies."""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from steerlab.data import CAA_BEHAVIOURS, ABDataset, IntegrityError, PromptSet, caa_url, fetch_caa, load_caa
from steerlab.data.fetch import CAA_PINS, caa_upstream_path

SHARED_NAME = {
    "generate": "generate.json",
    "test_ab": "test_ab.json",
    "test_open_ended": "test_open_ended.json",
}
SMALL = [("refusal", "test_open_ended"), ("corrigible-neutral-HHH", "test_ab")]


def build_mirror(shared_data: Path, root: Path, files=SMALL) -> Path:
    """Copy shared CAA files into `root`, renamed to the upstream layout."""
    for behaviour, split in files:
        target = root / caa_upstream_path(behaviour, split)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / "caa" / behaviour / SHARED_NAME[split], target)
    return root


class QuietHandler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        QuietHandler.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def served_mirror(shared_data, tmp_path):
    """(folder, base URL) of a mirror served over HTTP on 127.0.0.1 at a free port."""
    folder = build_mirror(shared_data, tmp_path / "mirror")
    QuietHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_pins_are_complete_and_well_formed():
    assert CAA_BEHAVIOURS == (
        "coordinate-other-ais",
        "corrigible-neutral-HHH",
        "hallucination",
        "myopic-reward",
        "refusal",
        "survival-instinct",
        "sycophancy",
    )
    assert len(CAA_PINS) == 21
    for (behaviour, split), (commit, sha) in CAA_PINS.items():
        assert behaviour in CAA_BEHAVIOURS and split in SHARED_NAME
        assert re.fullmatch(r"[0-9a-f]{40}", commit) and re.fullmatch(r"[0-9a-f]{64}", sha)


def test_pinned_hashes_match_shared_copies(shared_data):
    for (behaviour, split), (_, sha) in CAA_PINS.items():
        data = (shared_data / "caa" / behaviour / SHARED_NAME[split]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha, (behaviour, split)


def test_urls():
    assert caa_url("sycophancy", "test_ab") == (
        "https://raw.githubusercontent.com/nrimsky/CAA/e1fce128b6165a9926093c6abdf6ea9a24f4b5c4/"
        "datasets/test/sycophancy/test_dataset_ab.json"
    )
    assert (
        caa_url("refusal", "generate", mirror="http://host/m/")
        == "http://host/m/datasets/generate/refusal/generate_dataset.json"
    )
    assert caa_url("refusal", "test_open_ended", mirror="/srv/caa").endswith(
        "/srv/caa/datasets/test/refusal/test_dataset_open_ended.json"
    )


def test_unknown_behaviour_and_split(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown CAA behaviour 'power-seeking'; known: coordinate-other-ais, .*sycophancy"
    ):
        fetch_caa("power-seeking", cache_dir=tmp_path)
    with pytest.raises(
        ValueError, match=r"unknown CAA split 'test'; known: generate, test_ab, test_open_ended"
    ):
        fetch_caa("refusal", "test", cache_dir=tmp_path)


def test_fetch_through_http_mirror_and_cache(served_mirror, tmp_path):
    folder, url = served_mirror
    path = fetch_caa("refusal", "test_open_ended", cache_dir=tmp_path / "cache", mirror=url)
    assert (
        path
        == tmp_path / "cache" / "caa" / "e1fce128b616" / "datasets/test/refusal/test_dataset_open_ended.json"
    )
    assert path.read_bytes() == (folder / "datasets/test/refusal/test_dataset_open_ended.json").read_bytes()
    assert QuietHandler.requests == ["/datasets/test/refusal/test_dataset_open_ended.json"]
    assert fetch_caa("refusal", "test_open_ended", cache_dir=tmp_path / "cache", mirror=url) == path
    assert len(QuietHandler.requests) == 1  # served from the verified cache
    path.write_bytes(path.read_bytes()[:-1])  # a damaged cache entry is fetched again
    assert (
        fetch_caa("refusal", "test_open_ended", cache_dir=tmp_path / "cache", mirror=url).read_bytes()[-1:]
        == b"]"
    )
    assert len(QuietHandler.requests) == 2


def test_corrupted_download_is_rejected(served_mirror, tmp_path):
    folder, url = served_mirror
    source = folder / "datasets/test/corrigible-neutral-HHH/test_dataset_ab.json"
    data = bytearray(source.read_bytes())
    data[100] ^= 0x01
    source.write_bytes(bytes(data))
    expected = CAA_PINS[("corrigible-neutral-HHH", "test_ab")][1]
    actual = hashlib.sha256(bytes(data)).hexdigest()
    pattern = rf"datasets/test/corrigible-neutral-HHH/test_dataset_ab\.json: sha256 mismatch: expected {expected}, got {actual}"
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match=pattern):
        fetch_caa("corrigible-neutral-HHH", "test_ab", cache_dir=cache, mirror=url)
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # nothing partial left behind


def test_missing_file_on_mirror(served_mirror, tmp_path):
    _, url = served_mirror
    with pytest.raises(OSError, match=r"could not download .*hallucination.*404"):
        fetch_caa("hallucination", "test_ab", cache_dir=tmp_path / "cache", mirror=url)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_folder_mirror_from_environment(shared_data, tmp_path, monkeypatch):
    folder = build_mirror(shared_data, tmp_path / "mirror")
    monkeypatch.setenv("STEERLAB_MIRROR", str(folder))
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    path = fetch_caa("refusal", "test_open_ended")
    assert path.is_relative_to(tmp_path / "cache")
    prompts = load_caa("refusal", "test_open_ended")
    assert (
        isinstance(prompts, PromptSet)
        and len(prompts) == 50
        and prompts.name == "caa/refusal/test_open_ended"
    )
    items = load_caa("corrigible-neutral-HHH", "test_ab")
    assert isinstance(items, ABDataset) and len(items) == 50
