"""Activation Addition (ActAdd, Turner et al. 2023): the per-position residual difference of one prompt
pair, added at the front of the user's prompt.

Both sides of the pair are tokenised as raw text (no chat template) behind one attention-sink token at
position 0 and right-padded to the same length with a neutral token (by default the space token, as in
the paper). The vector is the difference of the residual streams after block L at positions 1..n, an
(n, D) block; the sink position, where both sides read the same token, is never part of it. Applying it
adds `coefficient x block` at positions 1..n of the user's prompt (behind the same sink), never at decode
steps, so cached and uncached generation agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch

import steerlab
from steerlab.data.templating import adds_bos
from steerlab.errors import UserError
from steerlab.evaluate.generation import generate_ids
from steerlab.hooks import add_block, as_module, capture_residual
from steerlab.io import ResultFileError, load_result, result_paths, save_result
from steerlab.models import LoadedModel
from steerlab.models.architectures import hidden_size, num_layers
from steerlab.steering.vector import InvalidVectorError, VectorError

SINK_FALLBACK = "<|endoftext|>"
"""The sink token for tokenizers that add no BOS, when their vocabulary has it (GPT-2, SmolLM2)."""


def sink_token_id(tokenizer, sink: str | None = None) -> int:
    """The token placed at position 0 of the pair and of every prompt.

    `sink` names a token of the vocabulary; by default the BOS the tokenizer adds to plain text, else
    `<|endoftext|>` (GPT-2's BOS and SmolLM2's document separator), else the tokenizer's BOS or EOS token.
    """
    if sink is None:
        if adds_bos(tokenizer):
            return int(tokenizer.bos_token_id)
        names = [SINK_FALLBACK, getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)]
        vocab = tokenizer.get_vocab()
        for name in names:
            if name is not None and name in vocab:
                return int(vocab[name])
        raise UserError(
            "sink: the tokenizer has no BOS, EOS or <|endoftext|> token; name one with sink=TOKEN"
        )
    vocab = tokenizer.get_vocab()
    if sink not in vocab:
        raise UserError(f"sink {sink!r}: not a token of this tokenizer's vocabulary")
    return int(vocab[sink])


def pad_token_id(tokenizer, pad: str = " ") -> int:
    """The neutral token that right-pads the shorter side of the pair: the one token `pad` encodes to."""
    ids = tokenizer(pad, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(
            f"pad {pad!r}: encodes to {len(ids)} tokens {list(ids)}; give text of exactly one token"
        )
    return int(ids[0])


def text_ids(tokenizer, text: str, what: str) -> list[int]:
    """`text` tokenised as raw text (no special tokens, no template); a `UserError` naming `what` if empty."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise UserError(f"{what} {text!r}: encodes to no token (for ActAdd's neutral side use ' ', a space)")
    return ids


def prompt_ids(tokenizer, text: str, sink_id: int, what: str = "prompt") -> list[int]:
    """The sink token followed by `text` tokenised as raw text."""
    return [sink_id, *text_ids(tokenizer, text, what)]


@dataclass
class ActAddVector:
    """An ActAdd vector: `block` (n, D) float32, row i added at prompt position 1 + i after block `layer`.

    `metadata` (JSON-serialisable) records the pair, its tokens, the pad and sink tokens, the model and the
    mean residual norm at the read positions. The constructor refuses a block that is not 2-D, holds NaN
    or infinite values, or is all zeros (`InvalidVectorError`).
    """

    layer: int
    block: torch.Tensor
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = None
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            problem = f"layer {self.layer!r} is not a layer index >= 0"
        elif not isinstance(self.block, torch.Tensor) or self.block.dim() != 2 or not self.block.shape[0]:
            shape = tuple(self.block.shape) if isinstance(self.block, torch.Tensor) else self.block
            problem = f"the block has shape {shape}; expected (positions, width)"
        elif not bool(torch.isfinite(self.block.detach()).all()):
            problem = "the block holds NaN or infinite values"
        elif not bool(self.block.detach().any()):
            problem = "the block is all zeros (the two sides of the pair read the same)"
        if problem:
            raise InvalidVectorError("ActAdd vector", problem)

    @property
    def positions(self) -> int:
        """n: how many prompt positions (1..n) receive the block."""
        return int(self.block.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.block.shape[1])

    def norm(self) -> float:
        """Frobenius norm of the block (the norm injected at coefficient 1, over all its positions)."""
        return float(self.block.detach().double().norm())

    def position_norms(self) -> list[float]:
        return [float(x) for x in self.block.detach().double().norm(dim=-1)]

    def check_compatible(self, model) -> None:
        """Raise a `VectorError` unless the block's width and layer fit `model`."""
        module = as_module(model)
        if hidden_size(module) != self.hidden_size:
            raise InvalidVectorError(
                "ActAdd vector",
                f"width {self.hidden_size} but this model's residual stream has width {hidden_size(module)}",
            )
        n = num_layers(module)
        if self.layer >= n:
            raise VectorError(f"ActAdd vector: layer {self.layer} but the model has {n} layers (0..{n - 1})")

    def apply(
        self, model, coefficient: float | torch.Tensor = 1.0, truncate: bool = False
    ) -> AbstractContextManager[None]:
        """Context manager adding `coefficient x block` at positions 1..n of every prompt (not at decode
        steps). Gradient-carrying: a `coefficient` or `block` with `requires_grad` receives gradients.

        A prompt of fewer than n + 1 tokens (sink included) raises a `UserError` during the forward pass
        unless `truncate=True`, which adds only the rows of the block that fit.
        """
        if not isinstance(coefficient, torch.Tensor) and not math.isfinite(coefficient):
            raise VectorError(f"coefficient {coefficient} is not a finite number")
        self.check_compatible(model)
        return add_block(model, {self.layer: coefficient * self.block}, start=1, truncate=truncate)

    # --- derived vectors: the same layer and positions, a new block ------------------------------------

    def _derived(self, block: torch.Tensor, method: str, **params) -> ActAddVector:
        metadata = {
            **self.metadata,
            "derived": [*self.metadata.get("derived", []), {"method": method, **params}],
        }
        metadata["norm"] = float(block.double().norm())
        metadata["position_norms"] = [float(x) for x in block.double().norm(dim=-1)]
        return ActAddVector(self.layer, block.float(), metadata)

    def keep_dimensions(self, dims: torch.Tensor | Sequence[int]) -> ActAddVector:
        """The block with every residual dimension outside `dims` (indices, or a (D,) bool mask) zeroed."""
        dims = torch.as_tensor(dims)
        mask = dims if dims.dtype == torch.bool else torch.zeros(self.hidden_size, dtype=torch.bool)
        if dims.dtype != torch.bool:
            if dims.numel() and (int(dims.min()) < 0 or int(dims.max()) >= self.hidden_size):
                raise VectorError(f"dimensions must lie in 0..{self.hidden_size - 1}")
            mask[dims.long()] = True
        if mask.shape != (self.hidden_size,):
            raise VectorError(
                f"a dimension mask has shape {tuple(mask.shape)}; expected ({self.hidden_size},)"
            )
        kept = int(mask.sum())
        return self._derived(self.block.detach() * mask, "keep-dimensions", kept=kept)

    def rescaled(self, norm: float) -> ActAddVector:
        """The block scaled to Frobenius norm `norm` (same direction, same positions)."""
        if not (math.isfinite(norm) and norm > 0):
            raise VectorError(f"norm {norm} must be a finite positive number")
        block = self.block.detach().double()
        return self._derived(block * (norm / block.norm()), "rescaled", norm=norm)

    def random_like(self, seed: int = 0) -> ActAddVector:
        """A control: a random Gaussian direction at each position, with that position's norm."""
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(self.block.shape, generator=generator, dtype=torch.float64)
        norms = self.block.detach().double().norm(dim=-1, keepdim=True)
        return self._derived(noise / noise.norm(dim=-1, keepdim=True) * norms, "random-control", seed=seed)

    # --- files ------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `<path>.safetensors` (the block) and `<path>.json` (metadata) atomically."""
        metadata = {**self.metadata, "layer": self.layer, "positions": self.positions}
        return save_result(path, {"block": self.block.detach().float()}, metadata, kind="ActAddVector")

    @classmethod
    def load(cls, path: str | Path) -> ActAddVector:
        """Read a saved vector; errors name the file (`ResultFileError`, `InvalidVectorError`)."""
        tensor_path, meta_path = result_paths(path)
        tensors, metadata = load_result(path, kind="ActAddVector")
        if set(tensors) != {"block"}:
            raise ResultFileError(f"{tensor_path}: expected one tensor 'block', found {sorted(tensors)}")
        layer = metadata.get("layer")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ResultFileError(f"{meta_path}: field 'layer' should be a layer index, got {layer!r}")
        try:
            return cls(layer, tensors["block"], metadata)
        except InvalidVectorError as error:
            raise InvalidVectorError(str(tensor_path), error.problem) from None


def pair_ids(tokenizer, positive: str, negative: str, pad: str = " ", sink: str | None = None):
    """The two sides as [sink] + tokens, the shorter right-padded with the `pad` token to equal length."""
    sink_id = sink_token_id(tokenizer, sink)
    pad_id = pad_token_id(tokenizer, pad)
    pos = prompt_ids(tokenizer, positive, sink_id, "positive")
    neg = prompt_ids(tokenizer, negative, sink_id, "negative")
    width = max(len(pos), len(neg))
    return pos + [pad_id] * (width - len(pos)), neg + [pad_id] * (width - len(neg)), sink_id, pad_id


@torch.no_grad()
def extract_actadd(
    lm: LoadedModel,
    positive: str = " weddings",
    negative: str = " ",
    layer: int = 6,
    *,
    pad: str = " ",
    sink: str | None = None,
) -> ActAddVector:
    """The ActAdd vector of one prompt pair at `layer` (negative counts from the end): residual(positive)
    minus residual(negative) after block `layer`, at positions 1..n (the sink at 0 excluded).

    pad: text of exactly one token that right-pads the shorter side (default " ", the space token).
    sink: the position-0 token (default: see `sink_token_id`).
    """
    n_layers = lm.info.num_layers
    if not -n_layers <= layer < n_layers:
        raise UserError(f"--layer {layer}: the model has {n_layers} layers (0..{n_layers - 1})")
    layer = layer % n_layers
    pos_ids, neg_ids, sink_id, pad_id = pair_ids(lm.tokenizer, positive, negative, pad, sink)
    if pos_ids == neg_ids:
        raise UserError(
            f"--positive {positive!r} and --negative {negative!r} are the same tokens once padded with {pad!r}"
        )
    ids = torch.tensor([pos_ids, neg_ids], device=lm.device)
    with capture_residual(lm.model, [layer]) as captured:
        lm.model(input_ids=ids, use_cache=False)
    hidden = captured[layer][:, 1:].double()  # (2, n, D) without the sink
    block = (hidden[0] - hidden[1]).float().cpu()
    if not bool(torch.isfinite(block).all()):
        raise UserError(f"ActAdd: the model overflows in {lm.dtype}; try float32")
    if not bool(block.any()):
        raise UserError(f"--positive {positive!r} and --negative {negative!r} give the same activations")
    convert = lm.tokenizer.convert_ids_to_tokens
    metadata = {
        "method": "actadd",
        "positive": positive,
        "negative": negative,
        "positive_tokens": convert(pos_ids),
        "negative_tokens": convert(neg_ids),
        "pad": {"text": pad, "id": pad_id},
        "sink": {"token": convert([sink_id])[0], "id": sink_id},
        "model": lm.info.to_dict(),
        "norm": float(block.double().norm()),
        "position_norms": [float(x) for x in block.double().norm(dim=-1)],
        "residual_norm": float(hidden.norm(dim=-1).mean()),
        "versions": {
            "steerlab": steerlab.__version__,
            "torch": torch.__version__,
            "transformers": version("transformers"),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return ActAddVector(layer, block, metadata)


def check_prompts(tokenizer, prompts: Sequence[str], positions: int, sink_id: int) -> list[list[int]]:
    """Each prompt as [sink] + tokens; a `UserError` for a prompt shorter than the block's `positions`."""
    encoded = []
    for index, text in enumerate(prompts):
        ids = prompt_ids(tokenizer, text, sink_id, f"prompt {index + 1}")
        if len(ids) - 1 < positions:
            raise UserError(
                f"prompt {index + 1} {text!r} has {len(ids) - 1} tokens but the ActAdd block covers "
                f"{positions} positions: give a longer prompt or truncate the block (--truncate)"
            )
        encoded.append(ids)
    return encoded


@torch.no_grad()
def generate_actadd(
    lm: LoadedModel,
    prompts: Sequence[str],
    vector: ActAddVector | None = None,
    coefficient: float = 1.0,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    truncate: bool = False,
    use_cache: bool = True,
    sink: str | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of raw-text `prompts` behind the sink token, steered by `coefficient x vector`
    at positions 1..n when a vector is given; batched with left padding.

    sink: the position-0 token; default the one recorded in the vector (else `sink_token_id`'s default).
    """
    tokenizer = lm.tokenizer
    if sink is None and vector is not None and "sink" in vector.metadata:
        sink_id = int(vector.metadata["sink"]["id"])
    else:
        sink_id = sink_token_id(tokenizer, sink)
    needed = 0 if vector is None or truncate else vector.positions
    sequences = check_prompts(tokenizer, prompts, needed, sink_id)
    if vector is not None:
        vector.check_compatible(lm.model)
    run = partial(
        generate_ids,
        lm,
        sequences,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        use_cache=use_cache,
        progress=progress,
    )
    if vector is None:
        replies = run()
    else:
        with vector.apply(lm, coefficient, truncate=truncate):
            replies = run()
    return tokenizer.batch_decode(replies, skip_special_tokens=True)
