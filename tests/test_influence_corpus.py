"""The streamed corpus: the same blocks as tokenising the whole file at once, memory and time that depend
on the blocks used and not on the file size, and UTF-8 errors that name the line and byte offset."""

from __future__ import annotations

import json
import random
import time
import tracemalloc

import pytest
import torch

from conftest import char_tokenizer
from steerlab.data.errors import DataFormatError
from steerlab.influence.corpus import read_blocks
from steerlab.influence.data import text_blocks

WORDS = ["the", "quick", "brown", "fox", "jumps", "émigré", "naïve", "😀", "Zürich", "—", "123", "4567"]
SEPARATORS = [" ", "", "\n", "  ", ". ", "\n\n", "\r\n"]


def _text(n: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(n))


def _trained(kind: str, text: str):
    """A small BPE tokenizer trained on `text`: byte-level (GPT-2 style) or Metaspace (SentencePiece style,
    which prepends a space to the text it is given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"])
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("kind", ["char", "bytelevel", "metaspace"])
@pytest.mark.parametrize(
    ("window", "margin", "chunk"), [(300, 40, 97), (4096, 256, 1000), (1 << 16, 1024, 1 << 16)]
)
def test_streamed_blocks_equal_whole_text_tokenisation(tmp_path, kind, window, margin, chunk):
    text = _text()
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode())
    tokenizer = char_tokenizer() if kind == "char" else _trained(kind, text)
    # the former in-memory behaviour: read the whole file, tokenise it, cut it into blocks
    whole = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    for n_blocks in (None, 5):
        expected = text_blocks(whole, 16, n_blocks)
        got = read_blocks(path, tokenizer, 16, n_blocks, window=window, margin=margin, chunk_bytes=chunk)
        assert got.blocks.dtype == torch.int32 and got.blocks.tolist() == expected


def test_few_blocks_of_a_large_corpus_read_little(tmp_path):
    """8 blocks of a 32 MB corpus: a few windows are read, whatever the file size (reading the file alone
    would allocate its 32 MB)."""
    path = tmp_path / "big.txt"
    line = "the quick brown fox jumps over the lazy dog, again and again.\n"
    path.write_text(line * (32_000_000 // len(line)))
    tokenizer = char_tokenizer()
    tracemalloc.start()
    start = time.perf_counter()
    got = read_blocks(path, tokenizer, 128, 8)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got.blocks.shape == (8, 128)
    assert got.blocks.flatten().tolist() == tokenizer(line * 20, add_special_tokens=False)["input_ids"][:1024]
    assert got.bytes_read <= 1 << 18  # a few 64 KiB chunks of 32 MB
    assert peak < 8_000_000 and seconds < 5


@pytest.mark.parametrize("chunk", [3, 7, 1 << 16])
def test_undecodable_byte_names_line_and_offset(tmp_path, chunk):
    path = tmp_path / "bad.txt"
    data = "first line\nsecond é line\nthird".encode()
    offset = data.index(b"third") + 2
    path.write_bytes(data[:offset] + b"\xff" + data[offset:])
    with pytest.raises(
        DataFormatError, match=rf"bad.txt: line 3: not UTF-8 text \(.* at byte offset {offset}\)"
    ):
        read_blocks(path, char_tokenizer(), 4, chunk_bytes=chunk)
    path.write_bytes(data + "é".encode()[:1])  # a character cut at the end of the file
    with pytest.raises(DataFormatError, match=rf"line 3: .* at byte offset {len(data)}"):
        read_blocks(path, char_tokenizer(), 4, chunk_bytes=chunk)


def test_too_short_corpus(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc")
    with pytest.raises(DataFormatError, match="short.txt: has 3 tokens, fewer than one block"):
        read_blocks(path, char_tokenizer(), 8)


def test_fit_reads_only_the_blocks_it_needs(tmp_path, capsys):
    """Through the command: a 24 MB corpus, 8 blocks; the run records the few bytes it read."""
    from conftest import tiny_model
    from steerlab.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    path = tmp_path / "big.txt"
    line = "the quick brown fox jumps over the lazy dog, again and again.\n"
    path.write_text(line * (24_000_000 // len(line)))
    run = tmp_path / "run"
    argv = ["influence", "fit", "--run", str(run), "--model", str(model_dir), "--train", str(path)]
    start = time.perf_counter()
    assert main([*argv, "--block-size", "32", "--n-blocks", "8", "--layers", "3"]) == 0
    assert time.perf_counter() - start < 60
    tokens = json.loads((run / "tokens" / "args.json").read_text())
    assert tokens["bytes"] <= 1 << 18 and len(tokens["sha256"]) == 64
