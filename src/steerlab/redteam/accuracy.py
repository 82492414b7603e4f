"""Making a model fail a benchmark it passes: a universal norm-bounded vector, trained on some items to
lower the probability of the right answer, against random vectors of the same norm, judged on held-out
items. Items are prepared `ABPrompts`: A/B questions (the answer letter, `prepare_ab`) or cloze stems (the
answer word, `prepare_cloze`); an item counts as right when its right option is the most probable one."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steerlab.errors import UserError
from steerlab.evaluate.probability import ABPrompts
from steerlab.evaluate.stats import bootstrap_ci
from steerlab.models import LoadedModel
from steerlab.redteam import attacks as A


def _per_item(prepared: ABPrompts, score) -> A.Objective:
    """An objective of `score(log P of each offered option, index of the right one)` per row."""

    def objective(logits: torch.Tensor, batch: A.Batch) -> torch.Tensor:
        logp = logits[:, -1].log_softmax(-1)
        return torch.stack(
            [
                score(logp[r, prepared.option_tokens[index]], prepared.matching_index[index])
                for r, index in enumerate(batch.rows)
            ]
        )

    return A.Objective("custom", custom=objective)


def ab_objective(prepared: ABPrompts) -> A.Objective:
    """Per row: log P(right letter) normalised over the offered letters (the attack minimises it)."""
    return _per_item(prepared, lambda options, right: options.log_softmax(-1)[right])


def ab_probability(prepared: ABPrompts) -> A.Objective:
    """Per row: P(right letter) among the offered letters, the attack's training loss. Bounded, so no item
    can dominate the mean: minimising mean log P instead is won by forcing one letter (on balanced items
    half go to log P -> -inf while accuracy stays near 1/2)."""
    log_p = ab_objective(prepared)
    return A.Objective("custom", custom=lambda logits, batch: log_p(logits, batch).exp())


def ab_margin(prepared: ABPrompts) -> A.Objective:
    """Per row: log P(right option) - max log P(other option); the model chooses right where it is > 0."""
    return _per_item(
        prepared,
        lambda options, right: options[right] - torch.cat([options[:right], options[right + 1 :]]).max(),
    )


def split_items(prepared: ABPrompts, n_train: int, seed: int = 0) -> tuple[ABPrompts, ABPrompts]:
    """A seeded split into `n_train` training items and the held-out rest."""
    if not 0 < n_train < len(prepared.prefixes):
        raise UserError(
            f"n_train {n_train}: must leave at least one of the {len(prepared.prefixes)} items on each side"
        )
    order = torch.randperm(len(prepared.prefixes), generator=torch.Generator().manual_seed(seed)).tolist()

    def pick(idx: list[int]) -> ABPrompts:
        return ABPrompts(
            [prepared.prefixes[i] for i in idx],
            [prepared.option_tokens[i] for i in idx],
            [prepared.matching_index[i] for i in idx],
        )

    return pick(order[:n_train]), pick(order[n_train:])


def accuracy_attack(
    lm: LoadedModel,
    items: ABPrompts,
    layers: Sequence[int],
    eps: Sequence[float],
    n_train: int = 20,
    n_random: int = 20,
    steps: int = 12,
    lr: float = 0.3,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict]:
    """Accuracy on the items left after drawing `n_train` training items, per (layer, eps), for the optimised vector and for random vectors of the
    same norm (mean and best-for-the-attacker over `n_random`), plus the unperturbed accuracy (eps 0)."""
    prep_train, prep_test = split_items(items, n_train, seed)
    n_test = len(prep_test.prefixes)
    batches_train = A.make_batches(lm, [], None, batch_size, token_ids=prep_train.prefixes)
    batches_test = A.make_batches(lm, [], None, batch_size, token_ids=prep_test.prefixes)
    obj_train, obj_test = ab_probability(prep_train), ab_margin(prep_test)

    def correct(layer: int, delta, caches) -> torch.Tensor:
        return (A.batch_scores(lm, layer, batches_test, obj_test, delta, caches) > 0).double()

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
                    "n_test": n_test,
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
                    "n_test": n_test,
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
                    "n_test": n_test,
                }
            )
    return rows


def accuracy_figure(
    rows: list[dict], title: str = "held-out accuracy under perturbation", chance: float = 0.5
):
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
    ax.axhline(chance, color="grey", lw=0.6, label="chance")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("eps (fraction of residual norm)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
