"""Extraction methods beyond the mean difference: PCA of paired differences, PCA of pair-centred
activations (as repeng's `pca_diff` / `pca_center`), and a logistic-regression probe.

These methods need every example's activation, not only sums: `example_activations` keeps one float64
row per example and layer (the mean over its read positions), and stops after the last layer needed.
Every returned direction is scaled to the norm of the mean difference at its layer, so a multiplier means
what it means for a CAA vector; residual norms are recorded as for mean-difference vectors.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steerlab.data import ABDataset, PairedTexts, ReadSpec, batches_by_length, pad_batch
from steerlab.data.templating import prompt_metadata
from steerlab.errors import UserError
from steerlab.hooks import run_to_layers
from steerlab.models import LoadedModel, resolve_layer
from steerlab.steering.extract import (
    LayerMeans,
    _dataset_metadata,
    _metadata,
    ab_read_specs,
    caa_items,
    check_extracted,
    check_system_prompt,
    text_read_spec,
)
from steerlab.steering.vector import SteeringVector


@torch.no_grad()
def example_activations(
    lm: LoadedModel,
    examples: Sequence[ReadSpec],
    layers: Sequence[int],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "reading activations",
) -> dict[int, torch.Tensor]:
    """Per-example activation (float64, CPU, shape (n, d)): the mean over each example's read positions."""
    resolved = sorted({resolve_layer(lm.model, layer) for layer in layers})
    rows = {layer: torch.zeros(len(examples), lm.info.hidden_size, dtype=torch.float64) for layer in resolved}
    pad_id = lm.tokenizer.pad_token_id or 0
    for group in tqdm(
        batches_by_length([len(ex.ids) for ex in examples], batch_size),
        desc=desc,
        disable=not progress,
        unit="batch",
    ):
        batch = [examples[i] for i in group]
        ids, mask = pad_batch([ex.ids for ex in batch], pad_id, lm.device)

        def keep(layer: int, hidden: torch.Tensor, batch=batch, group=group) -> None:
            for row, (index, ex) in enumerate(zip(group, batch, strict=True)):
                rows[layer][index] = hidden[row, ex.positions].double().mean(0).cpu()

        run_to_layers(lm.model, resolved, keep, input_ids=ids, attention_mask=mask)
    return rows


def pca_direction(train: torch.Tensor) -> torch.Tensor:
    """Unit first principal component of the rows of `train` (centred first, as sklearn's PCA)."""
    centred = train - train.mean(0)
    return torch.linalg.svd(centred, full_matrices=False).Vh[0]


def oriented(direction: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """`direction`, flipped if needed so that positives project higher on average than negatives."""
    return -direction if float((positive.mean(0) - negative.mean(0)) @ direction) < 0 else direction


def require_sklearn() -> None:
    """A `UserError` when scikit-learn, which the probe needs, is not installed."""
    if importlib.util.find_spec("sklearn") is None:
        raise UserError("--method probe: needs scikit-learn (pip install scikit-learn, or the [dev] extra)")


def logistic_direction(x: torch.Tensor, y: torch.Tensor, c: float = 1.0) -> tuple[torch.Tensor, float]:
    """L2 logistic regression on standardised `x`; its weights and bias mapped back to `x`'s basis.

    Returns (w, b) with w @ x_i + b the fitted logit of row i (label 1 = positive).
    """
    require_sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x.numpy())
    model = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x.numpy()), y.numpy())
    scale = torch.from_numpy(scaler.scale_)
    mean = torch.from_numpy(scaler.mean_)
    w = torch.from_numpy(model.coef_[0]) / scale
    return w, float(model.intercept_[0]) - float(w @ mean)


def _accuracy(w: torch.Tensor, b: float, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ w + b > 0).long() == y).double().mean())


def held_out_pairs(n: int, test_fraction: float, seed: int) -> list[int]:
    """The pair indices held out for the probe's accuracy (seeded; none with fewer than 4 pairs, and at
    least 2 pairs are kept for fitting)."""
    if not 0 <= test_fraction < 1:
        raise UserError(f"test_fraction must be in [0, 1), got {test_fraction}")
    count = min(int(round(n * test_fraction)), n - 2) if n >= 4 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:count])


def _read_specs(
    lm: LoadedModel,
    data: ABDataset | PairedTexts,
    read: str,
    system_prompt: str | None,
    chat: bool,
    balance: bool,
    seed: int,
    source: str | None,
) -> tuple[list[ReadSpec], list[ReadSpec], dict]:
    """Positive and negative ReadSpecs (A/B: the answer letter; texts: `read`) and their metadata."""
    if isinstance(data, ABDataset):
        used = caa_items(data, balance=balance, seed=seed)
        positive, negative = ab_read_specs(lm, used, system_prompt)
        meta = {
            "dataset": _dataset_metadata(used, source, letter_counts=used.letter_counts()),
            "read": "answer-letter",
            **prompt_metadata(lm.tokenizer, system_prompt),
        }
        return positive, negative, meta
    check_system_prompt(system_prompt, chat)
    positive = [text_read_spec(lm, t, read, system_prompt, chat) for t in data.positive]
    negative = [text_read_spec(lm, t, read, system_prompt, chat) for t in data.negative]
    meta = {"dataset": _dataset_metadata(data, source), "read": read}
    return positive, negative, {**meta, **prompt_metadata(lm.tokenizer, system_prompt, chat=chat)}


def _extract(
    lm: LoadedModel,
    data: ABDataset | PairedTexts,
    layers: Sequence[int],
    method: str,
    direction_fn,
    *,
    read: str = "last",
    system_prompt: str | None = None,
    chat: bool = False,
    balance: bool = True,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    source: str | None = None,
    params: dict | None = None,
) -> SteeringVector:
    """Read every example's activation at `layers`, fit `direction_fn(pos, neg) -> (unit, info)` per
    layer, orient and scale it; the reading options are those of every method (`extract_pca_diff`)."""
    positive, negative, meta = _read_specs(lm, data, read, system_prompt, chat, balance, seed, source)
    if len(positive) < 2:
        raise UserError(f"{method}: needs at least 2 pairs, got {len(positive)}")
    pos = example_activations(lm, positive, layers, batch_size, progress, desc="positive")
    neg = example_activations(lm, negative, layers, batch_size, progress, desc="negative")
    vectors, extra = {}, {}
    for layer in pos:
        scale = (pos[layer].mean(0) - neg[layer].mean(0)).norm()
        unit, info = direction_fn(pos[layer], neg[layer])
        vectors[layer] = (unit * scale).float()
        for key, value in info.items():
            extra.setdefault(key, {})[str(layer)] = value
    check_extracted(lm, method, vectors)

    def means(rows: dict[int, torch.Tensor]) -> LayerMeans:
        norms = {layer: float(x.norm(dim=1).mean()) for layer, x in rows.items()}
        return LayerMeans({layer: x.mean(0) for layer, x in rows.items()}, norms, len(positive))

    metadata = _metadata(lm, method, means(pos), means(neg), vectors, **meta)
    metadata.update(scale="mean-difference-norm", parameters={"seed": seed, **(params or {})}, **extra)
    return SteeringVector(vectors, metadata)


def extract_pca_diff(
    lm: LoadedModel, data: ABDataset | PairedTexts, layers: Sequence[int], **reading
) -> SteeringVector:
    """First principal component of the paired differences (positive - negative), centred (repeng's
    `pca_diff`); oriented so positives project higher on average, scaled to the mean difference's norm.

    `data`: A/B items (read at the answer letter, letters balanced unless `balance=False`) or paired
    texts (read at the last token or averaged, `read`). `reading`: `read` ("last"), `system_prompt`,
    `chat` (False), `balance` (True), `seed` (0), `batch_size` (8), `progress` (True), `source`.
    """

    def direction(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return oriented(pca_direction(pos - neg), pos, neg), {}

    return _extract(lm, data, layers, "pca-diff", direction, **reading)


def extract_pca_center(
    lm: LoadedModel, data: ABDataset | PairedTexts, layers: Sequence[int], **reading
) -> SteeringVector:
    """First principal component of all activations after subtracting each pair's mean from its two
    members (repeng's `pca_center`); oriented, scaled and read as `extract_pca_diff`."""

    def direction(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
        centre = (pos + neg) / 2
        return oriented(pca_direction(torch.cat([pos - centre, neg - centre])), pos, neg), {}

    return _extract(lm, data, layers, "pca-center", direction, **reading)


def extract_probe(
    lm: LoadedModel,
    data: ABDataset | PairedTexts,
    layers: Sequence[int],
    *,
    c: float = 1.0,
    test_fraction: float = 0.25,
    seed: int = 0,
    **reading,
) -> SteeringVector:
    """Logistic-regression direction (L2 with inverse strength `c`, on standardised activations, mapped
    back to the residual basis), positives labelled 1; scaled to the mean difference's norm.

    A seeded `test_fraction` of the pairs (both members; none with fewer than 4 pairs) is held out: the
    probe is fitted on the rest, and the metadata records `train_accuracy` and `held_out_accuracy`
    (null when nothing is held out) per layer. Needs scikit-learn.
    """

    def direction(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
        test = held_out_pairs(len(pos), test_fraction, seed)
        train = [i for i in range(len(pos)) if i not in set(test)]

        def rows(index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.cat([pos[index], neg[index]])
            return x, torch.cat([torch.ones(len(index)), torch.zeros(len(index))]).long()

        w, b = logistic_direction(*rows(train), c=c)
        info = {
            "train_accuracy": _accuracy(w, b, *rows(train)),
            "held_out_accuracy": _accuracy(w, b, *rows(test)) if test else None,
        }
        return w / w.norm(), info

    params = {"c": c, "test_fraction": test_fraction}
    return _extract(lm, data, layers, "probe", direction, seed=seed, params=params, **reading)
