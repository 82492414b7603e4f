"""A plain-text training corpus, read as a stream and cut into token blocks.

Only the beginning of the file that the requested blocks need is read and tokenised: memory and time
depend on `block_size x n_blocks`, not on the file size. The text is decoded incrementally (UTF-8,
universal newlines; an undecodable byte is an error naming the line and byte offset) and tokenised in
overlapping windows with character offsets: each window re-tokenises a little text before and after
the tokens it keeps, so the kept tokens equal those of tokenising the whole text at once for tokenizers
whose tokens depend on a few hundred characters around them (BPE and SentencePiece tokenizers do).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch

from steerlab.data.errors import DataFormatError

__all__ = ["CorpusBlocks", "check_corpus", "prefix_sha256", "read_blocks", "read_text_chunks"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16
WINDOW_CHARS = 1 << 12  # the first window; each next one is twice as long, up to MAX_WINDOW_CHARS
MAX_WINDOW_CHARS = 1 << 18
MARGIN_CHARS = 1024  # text re-tokenised on each side of a window's kept tokens


@dataclass
class CorpusBlocks:
    """`blocks` [n, block_size] token ids, and the corpus prefix they were read from (`bytes_read` bytes
    with sha256 `sha256`)."""

    blocks: torch.Tensor
    sha256: str
    bytes_read: int


class _Reader:
    """Decoded text chunks of a file; counts and hashes the bytes read."""

    def __init__(self, path: Path, chunk_bytes: int):
        self.path, self.chunk_bytes = path, chunk_bytes
        self.sha = hashlib.sha256()
        self.bytes_read = 0
        self.lines = 0  # newlines in the bytes read so far

    def chunks(self) -> Iterator[str]:
        utf8 = codecs.getincrementaldecoder("utf-8")()
        decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
        first = True
        try:
            with open(self.path, "rb") as f:
                while True:
                    raw = f.read(self.chunk_bytes)
                    text = self._decode(decoder, utf8, raw)
                    self.sha.update(raw)
                    self.bytes_read += len(raw)
                    self.lines += raw.count(b"\n")
                    if first:
                        text, first = text.removeprefix("\ufeff"), False
                    if text:
                        yield text
                    if not raw:
                        return
        except OSError as error:
            raise DataFormatError(self.path, f"cannot be read ({error.strerror or error})") from None

    def _decode(self, decoder, utf8, raw: bytes) -> str:
        pending = utf8.getstate()[0]
        try:
            return decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as error:
            data = pending + raw
            line = self.lines + data[: error.start].count(b"\n") + 1
            offset = self.bytes_read - len(pending) + error.start
            raise DataFormatError(
                self.path, f"not UTF-8 text ({error.reason} at byte offset {offset})", line=line
            ) from None


def read_text_chunks(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The file's text in pieces (UTF-8, universal newlines, a leading BOM dropped)."""
    return _Reader(Path(path), chunk_bytes).chunks()


def check_corpus(path: str | Path, option: str = "--train") -> Path:
    """The corpus path, after checking that it is a readable, non-empty file starting with UTF-8 text
    (cheap: reads one chunk); errors name `option` or the file."""
    from steerlab.influence.config import InfluenceArgumentError

    path = Path(path)
    if not path.exists():
        raise InfluenceArgumentError(f"{option}: no such file: {path}")
    if not path.is_file():
        raise InfluenceArgumentError(f"{option}: not a file: {path}")
    with closing(read_text_chunks(path)) as chunks:
        first = next(chunks, "")
    if not first.strip():
        raise DataFormatError(path, "the corpus is empty")
    return path


def _token_stream(chunks: Iterator[str], tokenizer, window: int, margin: int) -> Iterator[list[int]]:
    """Token ids of the concatenated chunks, in pieces, as if the whole text were tokenised at once."""
    buffer, start, eof = "", 0, False  # buffer[:start]: context whose tokens were already given
    while True:
        while not eof and len(buffer) - start < window + margin:
            piece = next(chunks, None)
            eof = piece is None
            buffer += piece or ""
        end = start + window + margin
        last = eof and end >= len(buffer)
        text = buffer if last else buffer[:end]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [s for s, _ in enc["offset_mapping"]]
        if last:
            yield [t for t, s in zip(enc["input_ids"], spans) if s >= start]
            return
        cut = next((s for s in spans if s >= len(text) - margin and s > start), None)
        if cut is None:  # one token spans the whole margin: take a longer window
            window *= 2
            continue
        yield [t for t, s in zip(enc["input_ids"], spans) if start <= s < cut]
        window = min(2 * window, max(window, MAX_WINDOW_CHARS))
        keep = max(0, cut - margin)
        buffer, start = buffer[keep:], cut - keep


def read_blocks(
    path: str | Path,
    tokenizer,
    block_size: int,
    n_blocks: int | None = None,
    *,
    window: int = WINDOW_CHARS,
    margin: int = MARGIN_CHARS,
    chunk_bytes: int = CHUNK_BYTES,
) -> CorpusBlocks:
    """The first `n_blocks` consecutive blocks of `block_size` tokens of a text file (every full block
    when `n_blocks` is None), reading and tokenising only as much of the file as they need.
    The tokenizer must be a fast (offset-mapping) Hugging Face tokenizer."""
    path = Path(path)
    if not getattr(tokenizer, "is_fast", False):
        raise DataFormatError(path, "reading a corpus needs a fast tokenizer (with offset mappings)")
    need = None if n_blocks is None else block_size * n_blocks
    reader = _Reader(path, chunk_bytes)
    ids: list[int] = []
    for piece in _token_stream(reader.chunks(), tokenizer, window, margin):
        ids.extend(piece)
        if need is not None and len(ids) >= need:
            break
    full = len(ids) // block_size if need is None else min(len(ids), need) // block_size
    if full == 0:
        raise DataFormatError(
            path, f"has {len(ids)} tokens, fewer than one block (--block-size {block_size})"
        )
    if n_blocks is not None and full < n_blocks:
        log.warning(
            "%s holds %d blocks of %d tokens, fewer than --n-blocks %d", path, full, block_size, n_blocks
        )
    blocks = torch.tensor(ids[: full * block_size], dtype=torch.int32).view(full, block_size)
    return CorpusBlocks(blocks, reader.sha.hexdigest(), reader.bytes_read)


def prefix_sha256(path: str | Path, n_bytes: int) -> str | None:
    """sha256 of the first `n_bytes` bytes of a file (None when it is missing or shorter)."""
    sha, left = hashlib.sha256(), n_bytes
    try:
        with open(path, "rb") as f:
            while left > 0:
                raw = f.read(min(left, CHUNK_BYTES))
                if not raw:
                    return None
                sha.update(raw)
                left -= len(raw)
    except OSError:
        return None
    return sha.hexdigest()
