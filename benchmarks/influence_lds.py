"""Counterfactual validity of influence scores on CPU in minutes (scikit-learn's bundled digits).

1. LDS (linear datamodeling score): train an MLP on the full training set; compute each strategy's
   scores (queries x train); retrain from the same initialisation on R random 50% subsets; per query,
   the Spearman correlation across subsets between the predicted effect sum_{i in subset} score(q, i) and
   the query's actual log-probability of its label. LDS = mean over queries.
   Exact references (float64): the exact damped Gauss-Newton influence q^T (G + D)^-1 z with G the full
   GGN of all weights (sum over classes weighted by p, no sampling) and D the per-module damping, and the
   exact per-layer-block GGN (G's diagonal blocks only). Every method gets a paired bootstrap CI (over
   queries) of its LDS minus the exact GGN's, on each data split (`--seeds`), and its cost (fit +
   preconditioning + scoring, seconds).
2. A damping sweep (EK-FAC LDS against the damping, as a multiple of the heuristic 0.1 x mean(Lambda)),
   on the first split.
3. Mislabelled examples: flip 10% of the training labels, retrain, rank training examples by
   self-influence; report the recall of flipped labels among the top 10% and 20% (first split).

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from steerlab.influence import (
    ClassificationTask,
    fit_factors,
    has_block,
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


@dataclass(frozen=True)
class Method:
    """A practical strategy as fitted: sampled labels (`samples` draws) or the exact expectation over the
    classes (`expected`), and exact Fisher blocks for modules with at most `block_max_params` weights."""

    strategy: str
    samples: int = 8
    expected: bool = False
    block_max_params: int | None = None
    unit_max_params: int | None = None


def methods(block_max_params: int) -> dict[str, Method]:
    return {
        "identity": Method("identity"),
        "diagonal": Method("diagonal"),
        "kfac": Method("kfac"),
        "ekfac": Method("ekfac"),
        "ekfac_expected": Method("ekfac", 1, True),
        "block": Method("block", 8, False, block_max_params),
        "block_1draw": Method("block", 1, False, block_max_params),
        "block_expected": Method("block", 1, True, block_max_params),
        "unit": Method("unit", 8, False, None, UNIT_MAX_PARAMS),
        "unit_expected": Method("unit", 1, True, None, UNIT_MAX_PARAMS),
    }


REFERENCES = ("exact_ggn", "block_exact")
UNIT_MAX_PARAMS = 10**6  # every module of the MLP (32 x 65^2 and 10 x 33^2)
DAMPINGS = ("weight_decay", "heuristic")


def damping_args(mode: str, weight_decay: float) -> dict:
    """`weight_decay`: the curvature of the training objective's L2 term, wd I, and nothing else (the
    model was trained on mean loss + wd/2 |theta|^2, whose Hessian is the per-example-scale GGN + wd I);
    `heuristic`: 0.1 x the mean eigenvalue of each module's curvature estimate."""
    return {"damping": 0.0, "weight_decay": weight_decay} if mode == "weight_decay" else {}


def flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(len(grads[n]), -1) for n in names], 1)


def exact_ggn(model, task_exact, train_batches, names, n_train) -> torch.Tensor:
    """G = (1/N) sum_n sum_c p_nc g_nc g_nc^T over all tracked weights, from the expected-Fisher copies."""
    from steerlab.influence.factors import per_example_gradients
    from steerlab.influence.pass_cache import run_batch

    modules = task_exact.modules(model)
    rows = []
    for batch in train_batches:
        cap = run_batch(model, task_exact, modules, batch, sample_seed=0)
        rows.append(flat({n: per_example_gradients(cap.inputs[n], cap.grads[n]) for n in names}, names))
    rows = torch.cat(rows).double()
    return rows.T @ rows / n_train


def exact_scores(ggn, sizes, q, t, damping: torch.Tensor) -> dict[str, torch.Tensor]:
    """q^T (G + D)^-1 t with the full G (exact_ggn) and with its diagonal blocks only (block_exact)."""
    out = {}
    for kind in REFERENCES:
        matrix = ggn if kind == "exact_ggn" else torch.block_diag(*_blocks(ggn, sizes))
        chol = torch.linalg.cholesky(matrix + torch.diag(damping))
        out[kind] = q @ torch.cholesky_solve(t.T, chol)
    return out


def _blocks(matrix: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    edges = np.cumsum([0, *sizes])
    return [matrix[a:b, a:b] for a, b in zip(edges[:-1], edges[1:])]


def fit_for(seed, model, task, task_exact, train_batches, method: Method):
    """The factors of one method (None for the identity)."""
    if method.strategy == "identity":
        return None
    return fit_factors(
        model,
        task_exact if method.expected else task,
        train_batches,
        seed=seed,
        samples=method.samples,
        diagonal=method.strategy == "diagonal",
        block_max_params=method.block_max_params,
        unit_max_params=method.unit_max_params,
    )


def run_split(args, seed: int, extras: bool) -> dict:
    """Every method's and reference's per-query LDS on one data split, for both damping modes, with the
    cost (seconds: fit + query gradients + preconditioning + scoring, weight-decay damping); with
    `extras`, the damping sweeps and the mislabelled-example recall."""
    (x, y), (xq, yq) = load_digits_split(args.n_train, args.n_query, seed)
    model = train(x, y, epochs=args.epochs, weight_decay=args.weight_decay).double()
    task = ClassificationTask()
    task_exact = ClassificationTask(exact_fisher=10)
    train_batches, query_batches = batches_of(x.double(), y), batches_of(xq.double(), yq)
    t = time.perf_counter()
    qgrads = query_gradients(model, task, query_batches)
    t_query = time.perf_counter() - t

    scores = {mode: {} for mode in DAMPINGS}
    seconds, factors_of = {}, {}
    for name, method in methods(args.block_max_params).items():
        t = time.perf_counter()
        factors_of[name] = fit_for(seed, model, task, task_exact, train_batches, method)
        for mode in DAMPINGS:
            if method.strategy == "identity":
                pre = preconditioned_queries(qgrads, None, "identity")
            else:
                kw = damping_args(mode, args.weight_decay)
                pre = preconditioned_queries(qgrads, factors_of[name], method.strategy, **kw)
            scores[mode][name] = pairwise_scores(model, task, train_batches, pre)["scores"]
            if mode == DAMPINGS[0]:
                seconds[name] = time.perf_counter() - t + t_query
    t = time.perf_counter()
    names = list(qgrads)
    sizes = [qgrads[n][0].numel() for n in names]
    q, tr = flat(qgrads, names), flat(query_gradients(model, task, train_batches), names)
    ggn = exact_ggn(model, task_exact, train_batches, names, args.n_train)
    scores["weight_decay"].update(exact_scores(ggn, sizes, q, tr, torch.full((len(ggn),), args.weight_decay)))
    t_exact = time.perf_counter() - t
    heuristic = torch.cat(
        [torch.full((k,), 0.1 * float(b.diagonal().mean())) for k, b in zip(sizes, _blocks(ggn, sizes))]
    )
    scores["heuristic"].update(exact_scores(ggn, sizes, q, tr, heuristic.double()))
    for kind in REFERENCES:
        seconds[kind] = t_exact + t_query
    check = float(
        (scores["weight_decay"]["block_expected"] - scores["weight_decay"]["block_exact"]).abs().max()
        / scores["weight_decay"]["block_exact"].abs().max()
    )

    gen = torch.Generator().manual_seed(seed + 1)
    masks = torch.stack(
        [torch.randperm(args.n_train, generator=gen) < args.n_train // 2 for _ in range(args.retrains)]
    )
    actual = torch.stack(
        [
            log_prob(train(x[m], y[m], epochs=args.epochs, weight_decay=args.weight_decay), xq, yq)
            for m in masks
        ]
    )
    out = {
        "seed": seed,
        "per_query": {mode: {k: lds(v, masks, actual) for k, v in scores[mode].items()} for mode in DAMPINGS},
        "seconds": seconds,
        "block_vs_reference_max_rel": check,
        "block_modules": [n for n in factors_of["block"].modules if has_block(factors_of["block"], n)],
    }
    if extras:
        sweeps = {}
        for scale in (0.1, 1.0, 10.0, 100.0):
            exact = exact_scores(ggn, sizes, q, tr, heuristic.double() * scale)
            for kind in REFERENCES:
                sweeps.setdefault(kind, {})[str(scale)] = float(np.nanmean(lds(exact[kind], masks, actual)))
        out["damping_sweep_exact"] = sweeps
        out.update(
            extras_of(
                args, seed, model, task, qgrads, factors_of["ekfac"], train_batches, masks, actual, x, y
            )
        )
    return out


def extras_of(args, seed, model, task, qgrads, factors, train_batches, masks, actual, x, y) -> dict:
    """The EK-FAC damping sweep and the mislabelled-example recall."""
    heuristic = {n: 0.1 * float(factors.get(n, "lambda").mean()) for n in factors.modules}
    sweep = {}
    for scale in (0.01, 0.1, 1.0, 10.0, 100.0):
        pre = preconditioned_queries(qgrads, factors, "ekfac", {n: v * scale for n, v in heuristic.items()})
        s = pairwise_scores(model, task, train_batches, pre)["scores"]
        sweep[str(scale)] = float(np.nanmean(lds(s, masks, actual)))
    out = {"damping_sweep_ekfac": sweep}
    flip_gen = torch.Generator().manual_seed(seed + 2)
    flipped = torch.randperm(args.n_train, generator=flip_gen)[: args.n_train // 10]
    y_noisy = y.clone()
    y_noisy[flipped] = (y[flipped] + torch.randint(1, 10, (len(flipped),), generator=flip_gen)) % 10
    noisy_model = train(x, y_noisy, epochs=args.epochs, weight_decay=args.weight_decay)
    noisy_batches = batches_of(x, y_noisy)
    noisy_factors = fit_factors(noisy_model, task, noisy_batches, seed=seed, samples=args.samples)
    is_flipped = torch.zeros(args.n_train, dtype=torch.bool)
    is_flipped[flipped] = True
    for strategy in ("identity", "ekfac"):
        self_inf = self_scores(noisy_model, task, noisy_batches, noisy_factors, strategy=strategy)
        order = self_inf.argsort(descending=True)
        for frac in (0.1, 0.2):
            top = order[: int(frac * args.n_train)]
            out[f"flip_recall_{strategy}_top{int(frac * 100)}"] = float(is_flipped[top].sum() / len(flipped))
    return out


def summary(splits: list[dict], mode: str, names: list[str]) -> tuple[dict, dict]:
    """Mean LDS over splits, and per method: LDS per split, LDS minus the exact GGN's (mean and paired
    bootstrap 95% CI over queries, per split and pooled over splits) and cost."""
    lds_mean, table = {}, {}
    ekfac_cost = np.mean([s["seconds"]["ekfac"] for s in splits])
    for name in names:
        per = [s["per_query"][mode][name] for s in splits]
        diffs = [p - s["per_query"][mode]["exact_ggn"] for p, s in zip(per, splits)]
        pooled = np.concatenate(diffs)
        lds_mean[name] = float(np.mean([np.nanmean(p) for p in per]))
        table[name] = {
            "lds_per_split": [round(float(np.nanmean(p)), 4) for p in per],
            "minus_exact": round(float(np.nanmean(pooled)), 4),
            "minus_exact_ci_pooled": [round(v, 4) for v in bootstrap_ci(pooled[~np.isnan(pooled)])],
            "minus_exact_ci_per_split": [[round(v, 4) for v in bootstrap_ci(d[~np.isnan(d)])] for d in diffs],
            "seconds_per_split": [round(s["seconds"][name], 3) for s in splits],
            "cost_over_ekfac": round(float(np.mean([s["seconds"][name] for s in splits]) / ekfac_cost), 2),
        }
    return lds_mean, table


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-query", type=int, default=200)
    parser.add_argument("--retrains", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0,1,2", help="data splits (comma-separated seeds)")
    parser.add_argument(
        "--samples", type=int, default=8, help="sampled labels per example for the true Fisher"
    )
    parser.add_argument(
        "--block-max-params", type=int, default=4096, help="largest module fitted with an exact block"
    )
    parser.add_argument(
        "--max-cost",
        type=float,
        default=3.0,
        help="lds_best: the best method costing at most this many times EK-FAC (fit + score)",
    )
    parser.add_argument(
        "--plot", default=None, help="write a PNG with LDS per strategy and the damping sweep"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = [run_split(args, seed, extras=i == 0) for i, seed in enumerate(seeds)]
    practical = list(methods(args.block_max_params))
    names = [*practical, *REFERENCES]
    lds_mean, table = summary(splits, "weight_decay", names)
    lds_heuristic, table_heuristic = summary(splits, "heuristic", names)
    result: dict = {f"lds_{n}": v for n, v in lds_mean.items()}
    affordable = [n for n in practical if table[n]["cost_over_ekfac"] <= args.max_cost]
    best = max(affordable, key=lambda n: lds_mean[n])  # within the cost budget
    best_any = max(practical, key=lambda n: lds_mean[n])
    gap = lds_mean["exact_ggn"] - lds_mean["ekfac"]
    diff_ekfac = np.concatenate(
        [s["per_query"]["weight_decay"]["ekfac"] - s["per_query"]["weight_decay"]["identity"] for s in splits]
    )
    result["lds_ci_low"], result["lds_ci_high"] = bootstrap_ci(diff_ekfac[~np.isnan(diff_ekfac)])
    result.update(
        {
            "lds_best": lds_mean[best],
            "best_strategy": best,
            "best_cost_over_ekfac": table[best]["cost_over_ekfac"],
            "gap_closed_fraction": (lds_mean[best] - lds_mean["ekfac"]) / gap if gap else None,
            "max_cost_over_ekfac": args.max_cost,
            "best_any_cost": {
                "strategy": best_any,
                "lds": lds_mean[best_any],
                "cost_over_ekfac": table[best_any]["cost_over_ekfac"],
            },
            "gap_closed": {n: round((lds_mean[n] - lds_mean["ekfac"]) / gap, 3) for n in practical}
            if gap
            else None,
            "damping": f"weight decay {args.weight_decay} (the training objective's L2 curvature), nothing tuned",
            "table": table,
            "heuristic_damping": {"lds": lds_heuristic, "table": table_heuristic},
            "block_modules": splits[0]["block_modules"],
            "block_vs_reference_max_rel": max(s["block_vs_reference_max_rel"] for s in splits),
            "seeds": seeds,
            "damping_sweep_ekfac": splits[0]["damping_sweep_ekfac"],
            "damping_sweep_exact": splits[0]["damping_sweep_exact"],
            **{k: v for k, v in splits[0].items() if k.startswith("flip_recall")},
            "n_retrains": args.retrains,
            "n_queries": args.n_query,
            "n_train": args.n_train,
            "samples": args.samples,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result))
    return result


def plot(result: dict, path: str) -> None:
    from steerlab.report.figures import new_figure, save_png

    fig, (ax1, ax2) = new_figure((8, 2.8), 1, 2)
    names = ["identity", "kfac", "ekfac", "ekfac_expected", "unit_expected", "block_exact", "exact_ggn"]
    colors = ["#999", "#8da0cb", "#4c72b0", "#4c72b0", "#55a868", "#c44e52", "#333"]
    ax1.bar(range(len(names)), [result[f"lds_{n}"] for n in names], color=colors)
    ax1.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    ax1.set_ylabel("LDS (mean Spearman)")
    ax1.set_title(
        f"digits MLP, {len(result['seeds'])} splits x {result['n_retrains']} retrains x "
        f"{result['n_queries']} queries",
        fontsize=9,
    )
    sweep = result["damping_sweep_ekfac"]
    ax2.semilogx([float(k) for k in sweep], list(sweep.values()), "o-", color="#4c72b0", label="EK-FAC")
    for kind, color in (("block_exact", "#c44e52"), ("exact_ggn", "#333")):
        exact = result["damping_sweep_exact"][kind]
        ax2.semilogx([float(k) for k in exact], list(exact.values()), "s-", color=color, label=kind)
    ax2.axhline(result["lds_identity"], color="#999", ls="--", label="identity")
    ax2.set_xlabel("damping / (0.1 x mean eigenvalue)")
    ax2.set_ylabel("LDS")
    ax2.legend(fontsize=8)
    ax2.set_title("damping sweep (first split)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=100)


if __name__ == "__main__":
    main()
