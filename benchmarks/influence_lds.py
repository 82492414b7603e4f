"""Counterfactual validity of influence scores on CPU in minutes (scikit-learn's bundled digits).

1. LDS (linear datamodeling score): train an MLP on the full training set; compute each strategy's
   scores (queries x train); retrain from the same initialisation on R random 50% subsets; per query,
   the Spearman correlation across subsets between the predicted effect sum_{i in subset} score(q, i) and
   the query's actual log-probability of its label. LDS = mean over queries. A bootstrap over queries
   gives a confidence interval for LDS(EK-FAC) - LDS(identity).
2. A damping sweep (EK-FAC LDS against the damping, as a multiple of the heuristic 0.1 x mean(Lambda)).
3. Mislabelled examples: flip 10% of the training labels, retrain, rank training examples by
   self-influence; report the recall of flipped labels among the top 10% and 20%.

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from steerlab.influence import (
    ClassificationTask,
    fit_factors,
    pairwise_scores,
    preconditioned_queries,
    query_gradients,
    self_scores,
)


def load_digits_split(n_train: int, n_query: int, seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    x, y = torch.tensor(x[order], dtype=torch.float32), torch.tensor(y[order], dtype=torch.long)
    return (x[:n_train], y[:n_train]), (x[n_train : n_train + n_query], y[n_train : n_train + n_query])


def make_model(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def train(x, y, *, epochs: int, weight_decay: float, init_seed: int = 0) -> nn.Module:
    """Full-batch Adam from a fixed initialisation (deterministic, so subsets differ only by their data)."""
    model = make_model(init_seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 0.5 * weight_decay * sum(
            (p**2).sum() for p in model.parameters()
        )
        loss.backward()
        opt.step()
    return model.eval()


def log_prob(model: nn.Module, x, y) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(x), -1).gather(1, y[:, None])[:, 0]


def batches_of(x, y, size: int = 256):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def lds(scores: torch.Tensor, masks: torch.Tensor, actual: torch.Tensor) -> np.ndarray:
    """Per-query Spearman(predicted, actual) over subsets. scores [Q, N], masks [R, N], actual [R, Q]."""
    predicted = (masks.double() @ scores.double().T).numpy()  # [R, Q]
    return np.array(
        [spearmanr(predicted[:, q], actual[:, q].numpy()).statistic for q in range(scores.shape[0])]
    )


def bootstrap_ci(diff: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-query", type=int, default=200)
    parser.add_argument("--retrains", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--samples", type=int, default=8, help="sampled labels per example for the true Fisher"
    )
    parser.add_argument(
        "--plot", default=None, help="write a PNG with LDS per strategy and the damping sweep"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    (x, y), (xq, yq) = load_digits_split(args.n_train, args.n_query, args.seed)
    model = train(x, y, epochs=args.epochs, weight_decay=args.weight_decay)
    task = ClassificationTask()
    train_batches, query_batches = batches_of(x, y), batches_of(xq, yq)
    factors = fit_factors(model, task, train_batches, seed=args.seed, diagonal=True, samples=args.samples)
    grads = query_gradients(model, task, query_batches)

    def scores_for(strategy: str, damping=None) -> torch.Tensor:
        pre = preconditioned_queries(grads, factors, strategy, damping)
        return pairwise_scores(model, task, train_batches, pre)["scores"]

    heuristic = {n: 0.1 * float(factors.get(n, "lambda").mean()) for n in factors.modules}
    strategies = {s: scores_for(s) for s in ("identity", "diagonal", "kfac", "ekfac")}
    t_scores = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(args.seed + 1)
    masks = torch.stack(
        [torch.randperm(args.n_train, generator=gen) < args.n_train // 2 for _ in range(args.retrains)]
    )
    actual = torch.stack(
        [
            log_prob(train(x[m], y[m], epochs=args.epochs, weight_decay=args.weight_decay), xq, yq)
            for m in masks
        ]
    )
    per_query = {s: lds(v, masks, actual) for s, v in strategies.items()}
    result = {f"lds_{s}": float(np.nanmean(v)) for s, v in per_query.items()}
    diff = per_query["ekfac"] - per_query["identity"]
    result["lds_ci_low"], result["lds_ci_high"] = bootstrap_ci(diff[~np.isnan(diff)])

    sweep = {}
    for scale in (0.01, 0.1, 1.0, 10.0, 100.0):
        # one damping per module: `scale` x the module heuristic (damping_for takes one value, so loop)
        pre_full = {}
        for n in factors.modules:
            pre_full[n] = preconditioned_queries({n: grads[n]}, factors, "ekfac", heuristic[n] * scale).full[
                n
            ]
        from steerlab.influence import Preconditioned

        s = pairwise_scores(model, task, train_batches, Preconditioned(pre_full, {}, {}))["scores"]
        sweep[str(scale)] = float(np.nanmean(lds(s, masks, actual)))

    # mislabelled-example detection by self-influence
    flip_gen = torch.Generator().manual_seed(args.seed + 2)
    flipped = torch.randperm(args.n_train, generator=flip_gen)[: args.n_train // 10]
    y_noisy = y.clone()
    y_noisy[flipped] = (y[flipped] + torch.randint(1, 10, (len(flipped),), generator=flip_gen)) % 10
    noisy_model = train(x, y_noisy, epochs=args.epochs, weight_decay=args.weight_decay)
    noisy_batches = batches_of(x, y_noisy)
    noisy_factors = fit_factors(noisy_model, task, noisy_batches, seed=args.seed, samples=args.samples)
    is_flipped = torch.zeros(args.n_train, dtype=torch.bool)
    is_flipped[flipped] = True
    for strategy in ("identity", "ekfac"):
        self_inf = self_scores(noisy_model, task, noisy_batches, noisy_factors, strategy=strategy)
        order = self_inf.argsort(descending=True)
        for frac in (0.1, 0.2):
            top = order[: int(frac * args.n_train)]
            result[f"flip_recall_{strategy}_top{int(frac * 100)}"] = float(
                is_flipped[top].sum() / len(flipped)
            )

    result.update(
        {
            "damping_sweep_ekfac": sweep,
            "n_retrains": args.retrains,
            "n_queries": args.n_query,
            "n_train": args.n_train,
            "seconds": round(time.perf_counter() - t0, 1),
            "seconds_scores": round(t_scores, 2),
        }
    )
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result))
    return result


def plot(result: dict, path: str) -> None:
    from steerlab.report.figures import new_figure, save_png

    fig, (ax1, ax2) = new_figure((8, 2.8), 1, 2)
    names = ["identity", "diagonal", "kfac", "ekfac"]
    ax1.bar(names, [result[f"lds_{n}"] for n in names], color=["#999", "#bbb", "#8da0cb", "#4c72b0"])
    ax1.set_ylabel("LDS (mean Spearman)")
    ax1.set_title(f"digits MLP, {result['n_retrains']} retrains, {result['n_queries']} queries", fontsize=9)
    sweep = result["damping_sweep_ekfac"]
    ax2.semilogx([float(k) for k in sweep], list(sweep.values()), "o-", color="#4c72b0", label="EK-FAC")
    ax2.axhline(result["lds_identity"], color="#999", ls="--", label="identity")
    ax2.set_xlabel("damping / (0.1 x mean eigenvalue)")
    ax2.set_ylabel("LDS")
    ax2.legend(fontsize=8)
    ax2.set_title("damping sweep", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=100)


if __name__ == "__main__":
    main()
