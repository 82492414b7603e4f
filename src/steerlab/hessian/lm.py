"""Language-model helpers: text sets, parameter selection by layer, and two-set curvature comparison."""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from torch import nn

from steerlab.data.errors import DataFormatError, read_text
from steerlab.hessian.lanczos import Eigenpairs, lanczos
from steerlab.hessian.operator import CurvatureOperator
from steerlab.hessian.params import ParameterSelectionError, select_params
from steerlab.hessian.subspace import (
    principal_angles,
    random_angle_baseline,
    specialisation,
    specialised_fraction,
)
from steerlab.hessian.tasks import lm_batches, lm_task


def read_texts(
    path: str | os.PathLike, n: int = 16, min_chars: int = 40, option: str | None = None
) -> list[str]:
    """The first `n` paragraphs (blank-line separated; long ones cut to 400 chars) with >= `min_chars`.

    A file that `read_text` refuses (missing, unreadable, not UTF-8, blank) or without such a paragraph is
    a `DataFormatError` naming the file (and `option`, e.g. "--text", for a missing file).
    """
    text = read_text(path, option)
    paras = [p.strip() for p in re.split(r"\n\s*\n", text)]
    out = [p[:400] for p in paras if len(p) >= min_chars]
    if not out:
        raise DataFormatError(path, f"no paragraph of at least {min_chars} characters")
    return out[:n]


def token_chunks(
    tokenizer, path: str | os.PathLike, n: int, length: int, option: str | None = None
) -> list[torch.Tensor]:
    """`n` consecutive, non-overlapping sequences of exactly `length` tokens from the start of a text
    file read as one stream (e.g. a WikiText split). Too short a file is a `DataFormatError` naming it."""
    text = read_text(path, option)
    need = n * length
    ids: list[int] = []
    start, step = 0, max(4 * need, 4096)
    while len(ids) < need and start < len(text):
        start += step
        ids = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        raise DataFormatError(path, f"{len(ids)} tokens, fewer than the {n} x {length} asked for")
    stream = torch.tensor(ids[:need], dtype=torch.long)
    return list(stream.view(n, length))


PARTS = ("mlp", "attention", "block")


def layer_params(
    model: nn.Module,
    layers: list[int] | None,
    part: str = "mlp",
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
) -> dict[str, nn.Parameter]:
    """Parameters of the MLP / attention / whole block of the given decoder layers (negative indices
    allowed; None: every decoder layer), narrowed by `include` / `exclude` regexes as in `select_params`."""
    from steerlab.models import attention, block, mlp
    from steerlab.models.architectures import num_layers

    getter = {"mlp": mlp, "attention": attention, "block": block}.get(part)
    if getter is None:
        raise ParameterSelectionError(f"part must be one of {', '.join(PARTS)}, not {part!r}")
    if layers is None:
        layers = list(range(num_layers(model)))
    try:
        modules = [getter(model, layer) for layer in layers]
    except IndexError as error:
        raise ParameterSelectionError(str(error)) from None
    return select_params(model, include, exclude, modules=modules)


def text_operator(
    model: nn.Module,
    tokenizer,
    texts: list[str] | list[torch.Tensor],
    params: dict[str, nn.Parameter],
    kind: str = "hessian",
    batch_size: int = 4,
    max_length: int = 48,
    shard: bool = False,
    cache_graph: bool = False,
) -> CurvatureOperator:
    """The curvature of the next-token loss on `texts` (padded batches on the parameters' device), or on
    token sequences of equal length (see `token_chunks`; batches without padding). `shard`: split the
    batches over torchrun processes; `cache_graph`: keep each batch's first-order graph between products
    (see `CurvatureOperator`)."""
    device = next(iter(params.values())).device
    if texts and isinstance(texts[0], torch.Tensor):
        batches = [
            {"input_ids": torch.stack(texts[i : i + batch_size]).to(device)}
            for i in range(0, len(texts), batch_size)
        ]
    else:
        batches = [
            {key: value.to(device) for key, value in batch.items()}
            for batch in lm_batches(tokenizer, texts, batch_size, max_length)
        ]
    return CurvatureOperator(
        model, lm_task(), batches, params, kind=kind, cache_graph=cache_graph, shard=shard
    )


def text_curvature(
    loaded,
    texts: list[str],
    layers: list[int] | None = None,
    part: str = "mlp",
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    kind: str = "hessian",
    batch_size: int = 4,
    max_length: int = 48,
    source: str | None = None,
    shard: bool = False,
    cache_graph: bool = False,
) -> tuple[CurvatureOperator, dict]:
    """The curvature operator of a `LoadedModel`'s next-token loss on `texts` (or token sequences) over the
    chosen parameters (see `layer_params`), and the metadata its results are saved with (`source`: where the
    texts came from)."""
    params = layer_params(loaded.model, layers, part, include, exclude)
    op = text_operator(
        loaded.model, loaded.tokenizer, texts, params, kind, batch_size, max_length, shard, cache_graph
    )
    meta = {"model": loaded.info.to_dict(), "operator": op.describe(), "text": source, "n_texts": len(texts)}
    return op, meta


def two_set_spectra(
    model: nn.Module,
    tokenizer,
    texts_a: list[str],
    texts_b: list[str],
    params: dict[str, nn.Parameter],
    k: int = 5,
    batch_size: int = 4,
    max_length: int = 48,
    tol: float = 1e-4,
    max_iter: int = 60,
    progress: bool = True,
) -> dict:
    """Top-k Hessian eigenpairs of the next-token loss on two text sets, the principal angles between
    them (with a random-subspace baseline) and each top vector's specialisation
    r = |v^T H_A v| / (|v^T H_A v| + |v^T H_B v|) (absolute curvatures)."""
    ops = {
        name: text_operator(model, tokenizer, texts, params, batch_size=batch_size, max_length=max_length)
        for name, texts in (("a", texts_a), ("b", texts_b))
    }
    eig: dict[str, Eigenpairs] = {
        name: lanczos(op.matvec, op.dim, k=k, which="LA", tol=tol, max_iter=max_iter, progress=progress)
        for name, op in ops.items()
    }
    vecs = torch.cat([eig["a"].vectors, eig["b"].vectors])
    r = specialisation(ops["a"].quadratics(vecs), ops["b"].quadratics(vecs))
    dim = ops["a"].dim
    return {
        "eigenpairs": eig,
        "dim": dim,
        "principal_angles_deg": np.degrees(principal_angles(eig["a"].vectors, eig["b"].vectors)).tolist(),
        "random_angle_baseline_deg": random_angle_baseline(dim, k, k, trials=3)["mean_deg"],
        "r_top_a": r[:k].tolist(),
        "r_top_b": r[k:].tolist(),
        "specialised_fraction": specialised_fraction(r),
        "n_products": sum(op.n_products for op in ops.values()),
    }
