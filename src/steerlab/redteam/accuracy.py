"""Making a model fail a benchmark it passes: a universal norm-bounded vector, trained on some A/B items to
lower the probability of the right letter, against random vectors of the same norm, judged on held-out
items (accuracy = P(right letter) > 1/2 among the offered letters, i.e. the model's choice)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steerlab.data import ABDataset
from steerlab.evaluate import prepare_ab
from steerlab.evaluate.probability import ABPrompts
from steerlab.evaluate.stats import bootstrap_ci
from steerlab.models import LoadedModel
from steerlab.redteam import attacks as A


def ab_objective(prepared: ABPrompts) -> A.Objective:
    """Per row: log P(right letter) normalised over the offered letters (the attack minimises it)."""

    def loss(logits: torch.Tensor, batch: A.Batch) -> torch.Tensor:
        logp = logits[:, -1].log_softmax(-1)
        out = []
        for r, index in enumerate(batch.rows):
            letters = logp[r, prepared.option_tokens[index]]
            out.append(letters.log_softmax(-1)[prepared.matching_index[index]])
        return torch.stack(out)

    return A.Objective("custom", custom=loss)


def ab_probability(prepared: ABPrompts) -> A.Objective:
    """Per row: P(right letter) among the offered letters, the attack's training loss. Bounded, so no item
    can dominate the mean: minimising mean log P instead is won by forcing one letter (on balanced items
    half go to log P -> -inf while accuracy stays near 1/2)."""
    log_p = ab_objective(prepared)
    return A.Objective("custom", custom=lambda logits, batch: log_p(logits, batch).exp())


def split_items(dataset: ABDataset, n_train: int, seed: int = 0) -> tuple[ABDataset, ABDataset]:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    pick = lambda idx: ABDataset([dataset.items[i] for i in idx], dataset.name, dataset.source)  # noqa: E731
    return pick(order[:n_train]), pick(order[n_train:])


def accuracy_attack(
    lm: LoadedModel,
    dataset: ABDataset,
    layers: Sequence[int],
    eps: Sequence[float],
    n_train: int = 20,
    n_random: int = 20,
    steps: int = 12,
    lr: float = 0.3,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict]:
    """Accuracy on held-out items per (layer, eps) for the optimised vector and for random vectors of the
    same norm (mean and best-for-the-attacker over `n_random`), plus the unperturbed accuracy (eps 0)."""
    train, test = split_items(dataset, n_train, seed)
    prep_train, prep_test = prepare_ab(lm, train), prepare_ab(lm, test)
    batches_train = A.make_batches(lm, [], None, batch_size, token_ids=prep_train.prefixes)
    batches_test = A.make_batches(lm, [], None, batch_size, token_ids=prep_test.prefixes)
    obj_train, obj_test = ab_probability(prep_train), ab_objective(prep_test)

    def correct(layer: int, delta, caches) -> torch.Tensor:
        return (
            A.batch_scores(lm, layer, batches_test, obj_test, delta, caches) > torch.log(torch.tensor(0.5))
        ).double()

    rows = []
    for layer in layers:
        caches = [A.block_input(lm, layer, b) for b in batches_test]
        if not rows:
            acc, low, high = bootstrap_ci(correct(layer, None, caches).numpy())
            rows.append(
                {
                    "method": "none",
                    "layer": None,
                    "eps": 0.0,
                    "accuracy": acc,
                    "low": low,
                    "high": high,
                    "worst_random": None,
                    "n_test": len(test),
                }
            )
        norm, _ = A.residual_stats(lm, layer, batches_train)
        warm = None
        for value in sorted(eps):
            radius = value * norm
            delta, _ = A.universal_attack(lm, layer, batches_train, obj_train, radius, steps, lr, init=warm)
            warm = delta
            acc, low, high = bootstrap_ci(correct(layer, delta, caches).numpy())
            rows.append(
                {
                    "method": "optimised",
                    "layer": layer,
                    "eps": value,
                    "accuracy": acc,
                    "low": low,
                    "high": high,
                    "worst_random": None,
                    "n_test": len(test),
                }
            )
            randoms = A.random_directions(delta.shape[-1], n_random, radius, seed=seed + layer)
            per = torch.stack([correct(layer, r, caches) for r in randoms])  # (V, N)
            acc, low, high = bootstrap_ci(per.mean(0).numpy())
            rows.append(
                {
                    "method": "random",
                    "layer": layer,
                    "eps": value,
                    "accuracy": acc,
                    "low": low,
                    "high": high,
                    "worst_random": float(per.mean(1).min()),
                    "n_test": len(test),
                }
            )
    return rows


def accuracy_figure(rows: list[dict], title: str = "held-out A/B accuracy under perturbation"):
    """Accuracy against eps, one line per (layer, method); the unperturbed accuracy dotted."""
    from steerlab.report.figures import new_figure

    fig, ax = new_figure((5.0, 3.4))
    base = next((r["accuracy"] for r in rows if r["method"] == "none"), None)
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, layer in enumerate(layers):
        for method, style in (("optimised", "-"), ("random", "--")):
            mine = sorted(
                (r for r in rows if r["layer"] == layer and r["method"] == method), key=lambda r: r["eps"]
            )
            ax.plot(
                [r["eps"] for r in mine],
                [r["accuracy"] for r in mine],
                style,
                marker="o",
                ms=3,
                color=colours[i % len(colours)],
                label=f"L{layer} {method}",
            )
    if base is not None:
        ax.axhline(base, color="black", ls=":", lw=0.8, label="unperturbed")
    ax.axhline(0.5, color="grey", lw=0.6, label="chance")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("eps (fraction of residual norm)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
