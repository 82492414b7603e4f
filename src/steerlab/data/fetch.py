"""Download the public CAA datasets (nrimsky/CAA) from pinned commits, verifying pinned sha256 hashes.

Provenance of the pins. Each file is pinned to the nrimsky/CAA commit at which the public code index holds
that file's version; its length (characters) and its last characters were checked against that stored
version, and the sha256 was computed from the byte copies in the project's shared data folder, which
SOURCES.md records as equal to upstream (taken from a mirror, cross-checked against a second independent
copy). Both the stored upstream versions and the copies end with "]" and no trailing newline. Residual
uncertainty: the code index may normalise a trailing newline, so if upstream ended with "\\n" the raw download
would fail verification (loudly, with both hashes); point `mirror` at a verified copy in that case.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

UPSTREAM_REPO = "nrimsky/CAA"
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"

# Commits of nrimsky/CAA (full hashes).
_C8900 = "8900aed8b2d828095d1ed0e856f59b245e9bb13a"
_CE1FC = "e1fce128b6165a9926093c6abdf6ea9a24f4b5c4"
_C59F3 = "59f33bb3cd9b710ce57693a50a569ef72c4815db"
_C0AEC = "0aec415b166171f84c7034bd0d9d1ddf5e6ebf46"

CAA_SPLITS = ("generate", "test_ab", "test_open_ended")

# (behaviour, split) -> (commit, sha256 of the file's bytes)
# fmt: off
CAA_PINS: dict[tuple[str, str], tuple[str, str]] = {
    ("coordinate-other-ais", "generate"): (_C8900, "643717af88eeef37468ceb9f80322b1ebdb4e3934a114a79fc9b930105d6ac71"),
    ("coordinate-other-ais", "test_ab"): (_CE1FC, "9f315149225f1c1daeb65a684eca097f884b87a153d1ed8ce2c2c15abe5fae23"),
    ("coordinate-other-ais", "test_open_ended"): (_C8900, "170b7aa95ac6650a69eba281892ae486e34c4dc03265025abed3a5fc34a11f78"),
    ("corrigible-neutral-HHH", "generate"): (_C8900, "c93d4d8db72ab1de875b79367d08e00b3ba27675480d4315fd942bf676359893"),
    ("corrigible-neutral-HHH", "test_ab"): (_CE1FC, "847759b4daf48b7d941f08a213ed7095414d1a3063354eb4ebe1dfffc4522cd0"),
    ("corrigible-neutral-HHH", "test_open_ended"): (_C8900, "65f8a9bd2bb9fd2d31deb1a2699b7c7ec47de1c040aae8c4938beffebacf3a50"),
    ("hallucination", "generate"): (_C8900, "11dfb47cee064d037b9c66a1e56da6dfb9257f5c53bc29a4310c83a45de1bfe3"),
    ("hallucination", "test_ab"): (_C8900, "aca893768df46b7fb4a546b220fab327a58fd77dedcb49210b396bd24efe7dc6"),
    ("hallucination", "test_open_ended"): (_C8900, "f89d149f24eea3be3caf5e6fa32ea7b31f25798666062489374316b2b303b3ae"),
    ("myopic-reward", "generate"): (_CE1FC, "3ae9dc68fc4a6f3dbc441ef9956e543b5c7a5a5d97a3cc770f1942477f212b7e"),
    ("myopic-reward", "test_ab"): (_CE1FC, "5a7446706263e4bb67965fa48a3beb433cede5476ac735b0e2d26dd7e155d2fe"),
    ("myopic-reward", "test_open_ended"): (_CE1FC, "3129eef01e2e7da60648839920dc09a8826fa18948af3c1153750edf57baadb3"),
    ("refusal", "generate"): (_CE1FC, "966f6f32d5c2246579a1d9b544c082790fec6067d4efea6c6ef755c9d0a154a4"),
    ("refusal", "test_ab"): (_CE1FC, "982838b5429f1389a36fcf59c40ddb7eb4e462cfa1464d7857b8629cd384321b"),
    ("refusal", "test_open_ended"): (_CE1FC, "285e4526971c78afd1af372932be1396577424761056ede8a33983403a4b618d"),
    ("survival-instinct", "generate"): (_C8900, "249a1807e6938223e66795cdd7a7212340d8612aa9bb185947669135b052697a"),
    ("survival-instinct", "test_ab"): (_C8900, "750a96d7864c864b39168efed636cd79289bad6746024922a7367ccc171f951f"),
    ("survival-instinct", "test_open_ended"): (_CE1FC, "9b660b7d0ef3ab32ba64f7967100a416f4b9fffe50571fe36a4d0679e0a213af"),
    ("sycophancy", "generate"): (_C59F3, "1394c959d97ffae28fe9df71ce07a402c13c9333159307a28bd664fbe355b8b0"),
    ("sycophancy", "test_ab"): (_CE1FC, "96391f0468cadb5214c34dff9f614be6725699d9f395387f8a9b6ca630d9cb77"),
    ("sycophancy", "test_open_ended"): (_C0AEC, "6182d58715f29ee38be7427cbcc9da0a9b9c8a09d3f1fda17809e724e062611d"),
}
# fmt: on

CAA_BEHAVIOURS = tuple(dict.fromkeys(behaviour for behaviour, _ in CAA_PINS))


class IntegrityError(RuntimeError):
    """A downloaded file's sha256 differs from the pinned one (the download is discarded)."""


def caa_upstream_path(behaviour: str, split: str = "generate") -> str:
    """The file's path inside nrimsky/CAA, e.g. datasets/test/<b>/test_dataset_ab.json."""
    if behaviour not in CAA_BEHAVIOURS:
        raise ValueError(f"unknown CAA behaviour {behaviour!r}; known: {', '.join(CAA_BEHAVIOURS)}")
    if split not in CAA_SPLITS:
        raise ValueError(f"unknown CAA split {split!r}; known: {', '.join(CAA_SPLITS)}")
    if split == "generate":
        return f"datasets/generate/{behaviour}/generate_dataset.json"
    suffix = "ab" if split == "test_ab" else "open_ended"
    return f"datasets/test/{behaviour}/test_dataset_{suffix}.json"


def caa_url(behaviour: str, split: str = "generate", mirror: str | None = None) -> str:
    """Where the file is fetched from: the pinned raw GitHub URL, or `<mirror>/<upstream path>`."""
    path = caa_upstream_path(behaviour, split)
    if mirror:
        if "://" in mirror:
            return f"{mirror.rstrip('/')}/{path}"
        return Path(mirror, path).resolve().as_uri()
    commit, _ = CAA_PINS[(behaviour, split)]
    return RAW_URL.format(repo=UPSTREAM_REPO, commit=commit, path=path)


def default_cache_dir() -> Path:
    """$STEERLAB_CACHE or ~/.cache/steerlab, as for converted models."""
    return Path(os.environ.get("STEERLAB_CACHE", Path.home() / ".cache" / "steerlab"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, target: Path, expected: str, label: str, timeout: float) -> None:
    """Stream `url` into a temporary file next to `target`, verify its sha256, then move it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False
    )
    temp = Path(handle.name)
    try:
        digest = hashlib.sha256()
        with handle:
            request = urllib.request.Request(url, headers={"User-Agent": "steerlab"})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    while block := response.read(1 << 20):
                        digest.update(block)
                        handle.write(block)
            except (urllib.error.URLError, OSError) as error:
                raise OSError(f"could not download {label} from {url}: {error}") from error
        actual = digest.hexdigest()
        if actual != expected:
            raise IntegrityError(
                f"{label}: sha256 mismatch: expected {expected}, got {actual} (from {url}); the download was discarded"
            )
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def fetch_caa(
    behaviour: str,
    split: str = "generate",
    cache_dir: str | os.PathLike | None = None,
    mirror: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Return the local path of a CAA file, downloading and verifying it first if needed.

    `split` is "generate", "test_ab" or "test_open_ended". Files are cached under
    `<cache_dir>/caa/<commit[:12]>/<upstream path>` (default cache: $STEERLAB_CACHE or ~/.cache/steerlab);
    a cached file is re-verified and re-downloaded when its hash is wrong. `mirror` (or $STEERLAB_MIRROR)
    is a folder or base URL laid out like the upstream repository. Raises IntegrityError on a hash mismatch.
    """
    path = caa_upstream_path(behaviour, split)
    commit, expected = CAA_PINS[(behaviour, split)]
    mirror = mirror if mirror is not None else os.environ.get("STEERLAB_MIRROR") or None
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "caa" / commit[:12] / path
    if target.is_file() and sha256_of(target) == expected:
        return target
    _download(
        caa_url(behaviour, split, mirror), target, expected, f"{UPSTREAM_REPO}@{commit[:12]}:{path}", timeout
    )
    return target


def load_caa(behaviour: str, split: str = "generate", **fetch_options: Any) -> Any:
    """Fetch and load a CAA file: an ABDataset for generate / test_ab, a PromptSet for test_open_ended."""
    from steerlab.data.contrast import load_caa_json
    from steerlab.data.texts import load_prompts

    local = fetch_caa(behaviour, split, **fetch_options)
    name = f"caa/{behaviour}/{split}"
    return load_prompts(local, name=name) if split == "test_open_ended" else load_caa_json(local, name=name)
