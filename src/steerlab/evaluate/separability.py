"""How well a steering direction separates positive from negative activations (AUROC of projections)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from steerlab.data.batching import ReadSpec, batches_by_length, pad_batch
from steerlab.evaluate.stats import auroc
from steerlab.hooks import run_to_layers
from steerlab.models import LoadedModel, resolve_layer


@torch.no_grad()
def projections(
    lm: LoadedModel,
    examples: Sequence[ReadSpec],
    directions: Mapping[int, torch.Tensor],
    batch_size: int = 8,
) -> dict[int, list[float]]:
    """Per example and layer: the read-position activation (averaged) projected on the unit direction.

    directions: one vector per layer (e.g. `SteeringVector.vectors`).
    """
    layers = sorted(directions)
    units = {
        layer: (directions[layer] / directions[layer].norm()).to(lm.device, torch.float64) for layer in layers
    }
    out: dict[int, list[float | None]] = {
        resolve_layer(lm.model, layer): [None] * len(examples) for layer in layers
    }
    pad_id = lm.tokenizer.pad_token_id or 0
    for group in batches_by_length([len(ex.ids) for ex in examples], batch_size):
        ids, mask = pad_batch([examples[i].ids for i in group], pad_id, lm.device)

        def project(layer: int, hidden: torch.Tensor, group=group) -> None:
            for row, index in enumerate(group):
                picked = hidden[row, examples[index].positions].double().mean(0)
                out[layer][index] = float(picked @ units[layer])

        run_to_layers(lm.model, layers, project, input_ids=ids, attention_mask=mask)
    return out  # type: ignore[return-value]


def separability(
    lm: LoadedModel,
    positive: Sequence[ReadSpec],
    negative: Sequence[ReadSpec],
    directions: Mapping[int, torch.Tensor],
) -> dict[int, float]:
    """AUROC per layer of positive vs negative examples projected on the directions (0.5: no separation)."""
    pos, neg = projections(lm, positive, directions), projections(lm, negative, directions)
    return {layer: auroc(pos[layer], neg[layer]) for layer in pos}
