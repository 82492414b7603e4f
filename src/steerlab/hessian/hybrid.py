"""The hybrid-digits experiment (after Vaintrob & Rimsky 2023) on scikit-learn's bundled 8x8 digits.

Each class c owns a random 8x8 pattern P_c. A *blended* sample mixes a digit image of class c with a noisy
P_c; *digit-only* and *pattern-only* samples carry one signal. A small MLP trained on the three-way mix
learns two independent skills. Hessians on digit-only and pattern-only data give one direction per
skill; perturbing along one skill's top eigenvector with the other's top eigenvectors projected out
should destroy that skill and spare the other.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from steerlab.hessian.lanczos import lanczos
from steerlab.hessian.operator import CurvatureOperator
from steerlab.hessian.params import block_slices, select_params
from steerlab.hessian.separate import (
    cluster_directions,
    equalised_directions,
    per_sample_ggn_traces,
    separable_directions,
    tempered_basis,
)
from steerlab.hessian.subspace import (
    perturbation_sweep,
    principal_angles,
    project_out,
    random_angle_baseline,
    specialisation,
    specialised_fraction,
)
from steerlab.hessian.tasks import accuracy, classification_task, train_classifier


@dataclass(frozen=True)
class HybridConfig:
    """Everything fixed in advance, including the perturbation size `t` (for unit directions)."""

    seed: int = 0
    arch: str = "mlp"  # "mlp" (64-hidden-10) or "cnn" (two 3x3 convs on the 8x8 image, then linear)
    hidden: int = 64
    cnn_channels: tuple[int, int] = (8, 12)
    dtype: str = "float64"  # of the model, training and products (products are always summed in float64)
    unsupervised: bool = True  # also run the three mixed-data methods (ICA, clustering, equalised GGN)
    blend: float = 0.5  # weight of the digit in a blended image
    pattern_noise: float = 0.35
    train_steps: int = 600
    lr: float = 1e-2
    weight_decay: float = 1e-4
    k_project: int = 10  # top eigenvectors of the *other* subset projected out
    t: float = 4.0
    sweep: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
    n_random: int = 10
    n_top: int = 20
    lanczos_tol: float = 1e-8
    ica_basis: int = 20  # top mixed-Hessian eigenvectors the unsupervised method rotates within
    cluster_basis: int = 40  # top mixed-Hessian eigenvectors the clustering method works within
    n_clusters: int = 3


def _patterns(gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(10, 64, generator=gen) < 0.3).double()


def _pattern_samples(
    patterns: torch.Tensor, labels: torch.Tensor, noise: float, gen: torch.Generator
) -> torch.Tensor:
    x = patterns[labels] + noise * torch.randn(len(labels), 64, generator=gen, dtype=torch.float64)
    return x.clamp(0, 1)


def make_hybrid_digits(cfg: HybridConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Splits: `train_mix` (blended + digit-only + pattern-only thirds), `train_digit`, `train_pattern`,
    `test_digit`, `test_pattern`, `test_blend`. Inputs are float64 (n, 64) in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y_all = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(y_all), generator=gen)
    x_all, y_all = x_all[perm], y_all[perm]
    n_train = 1200
    x_tr, y_tr, x_te, y_te = x_all[:n_train], y_all[:n_train], x_all[n_train:], y_all[n_train:]
    patterns = _patterns(gen)
    third = n_train // 3
    yb, yd, yp = y_tr[:third], y_tr[third : 2 * third], y_tr[2 * third :]
    xb = cfg.blend * x_tr[:third] + (1 - cfg.blend) * _pattern_samples(patterns, yb, cfg.pattern_noise, gen)
    xd = x_tr[third : 2 * third]
    xp = _pattern_samples(patterns, yp, cfg.pattern_noise, gen)
    y_pat_test = torch.randint(0, 10, (len(y_te),), generator=gen)
    return {
        "train_mix": (torch.cat([xb, xd, xp]), torch.cat([yb, yd, yp])),
        "train_digit": (xd, yd),
        "train_pattern": (xp, yp),
        "test_digit": (x_te, y_te),
        "test_pattern": (_pattern_samples(patterns, y_pat_test, cfg.pattern_noise, gen), y_pat_test),
        "test_blend": (
            cfg.blend * x_te + (1 - cfg.blend) * _pattern_samples(patterns, y_te, cfg.pattern_noise, gen),
            y_te,
        ),
    }


def make_mlp(cfg: HybridConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    return nn.Sequential(nn.Linear(64, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10)).to(
        getattr(torch, cfg.dtype)
    )


def make_cnn(cfg: HybridConfig) -> nn.Module:
    """The flat 64-pixel input as a 1x8x8 image: conv 3x3 (c1) - ReLU - conv 3x3 (c2) - ReLU - 2x2 max-pool
    - linear to 10 classes (2 886 parameters with the default channels)."""
    torch.manual_seed(cfg.seed)
    c1, c2 = cfg.cnn_channels
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 16, 10),
    ).to(getattr(torch, cfg.dtype))


def make_model(cfg: HybridConfig) -> nn.Module:
    if cfg.arch not in ("mlp", "cnn"):
        raise ValueError(f"arch must be 'mlp' or 'cnn', not {cfg.arch!r}")
    return make_mlp(cfg) if cfg.arch == "mlp" else make_cnn(cfg)


def layer_blocks(model: nn.Module) -> dict[str, str]:
    """One include-regex per layer that has parameters (weight and bias together)."""
    layers = dict.fromkeys(name.rsplit(".", 1)[0] for name, _ in model.named_parameters())
    return {f"layer{layer}": rf"^{layer}\." for layer in layers}


def _trained(cfg: HybridConfig) -> tuple[dict, nn.Module, list[float]]:
    """The seed's data (in the model's dtype), the model trained on `train_mix`, and its training losses."""
    dtype = getattr(torch, cfg.dtype)
    data = {name: (x.to(dtype), y) for name, (x, y) in make_hybrid_digits(cfg).items()}
    model = make_model(cfg)
    losses = train_classifier(model, *data["train_mix"], cfg.train_steps, cfg.lr, cfg.weight_decay)
    return data, model, losses


def run_seed(cfg: HybridConfig) -> dict:
    """Train, compute the spectra, run the targeted and random perturbations and the specialisation scores."""
    t0 = time.perf_counter()
    data, model, losses = _trained(cfg)
    params = select_params(model)
    task = classification_task()

    def op(split: str, kind: str = "hessian") -> CurvatureOperator:
        return CurvatureOperator(model, task, [data[split]], params, kind=kind, cache_graph=True)

    h_d, h_p, h_m = op("train_digit"), op("train_pattern"), op("train_mix")
    k = max(cfg.k_project, cfg.n_top) if cfg.unsupervised else cfg.k_project
    wanted = [("digit", h_d, k), ("pattern", h_p, k)]
    if cfg.unsupervised:
        wanted.append(("mix", h_m, max(k, cfg.ica_basis, cfg.cluster_basis)))
    eig = {
        name: lanczos(o.matvec, o.dim, k=kk, which="LA", tol=cfg.lanczos_tol, seed=cfg.seed, progress=False)
        for name, o, kk in wanted
    }
    v_pat = project_out(eig["pattern"].vectors[0], eig["digit"].vectors[: cfg.k_project])
    v_dig = project_out(eig["digit"].vectors[0], eig["pattern"].vectors[: cfg.k_project])
    metrics = {
        "digit": lambda: accuracy(model, *data["test_digit"]),
        "pattern": lambda: accuracy(model, *data["test_pattern"]),
    }
    base = {name: fn() for name, fn in metrics.items()}
    base["blend"] = accuracy(model, *data["test_blend"])
    sweeps = {
        "pattern_dir": perturbation_sweep(params, v_pat, cfg.sweep, metrics),
        "digit_dir": perturbation_sweep(params, v_dig, cfg.sweep, metrics),
    }
    drops = {}
    for dname, v in (("pattern_dir", v_pat), ("digit_dir", v_dig)):
        at_t = perturbation_sweep(params, v, [cfg.t], metrics)
        for metric in metrics:
            drops[f"{metric}_drop_on_{dname}"] = base[metric] - at_t[metric][0]
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    random_drops, random_sweep_max = [], np.zeros(len(cfg.sweep))
    for _ in range(cfg.n_random):
        r = torch.randn(h_m.dim, generator=gen, dtype=torch.float64)
        r = r / r.norm()
        at_t = perturbation_sweep(params, r, [cfg.t], metrics)
        random_drops.append({m: base[m] - at_t[m][0] for m in metrics})
        sweep = perturbation_sweep(params, r, cfg.sweep, metrics)
        drop = np.max([base[m] - np.array(sweep[m]) for m in metrics], axis=0)
        random_sweep_max = np.maximum(random_sweep_max, drop)
    blocks = _blockwise(model, params, data, (v_pat, v_dig), cfg)
    unsupervised = _unsupervised(model, params, data, eig, op, cfg) if cfg.unsupervised else {}
    angles = np.degrees(
        principal_angles(eig["digit"].vectors[: cfg.k_project], eig["pattern"].vectors[: cfg.k_project])
    )
    return {
        "seed": cfg.seed,
        "arch": cfg.arch,
        "dim": h_m.dim,
        "final_train_loss": losses[-1],
        "base_accuracy": base,
        **drops,
        "random_drops": random_drops,
        "random_dir_max_drop": max(max(d.values()) for d in random_drops),
        "sweeps": sweeps,
        "random_sweep_max_drop": random_sweep_max.tolist(),
        "eigenvalues": {name: e.values[:k].tolist() for name, e in eig.items()},
        "hvp_counts": {name: e.n_products for name, e in eig.items()},
        "max_rel_residual": {
            name: float((e.residuals / e.values.abs().max()).max()) for name, e in eig.items()
        },
        **unsupervised,
        "blockwise": blocks,
        "principal_angles_digit_vs_pattern_deg": angles.tolist(),
        "random_angle_baseline_deg": random_angle_baseline(h_m.dim, cfg.k_project, cfg.k_project, trials=5)[
            "mean_deg"
        ],
        "seconds": time.perf_counter() - t0,
    }


def _unsupervised(model, params, data, eig, op, cfg: HybridConfig) -> dict:
    """The three mixed-data methods and their specialisation scores r (see `steerlab.hessian.separate`)."""
    # specialisation r = v^T G_D v / (v^T G_D v + v^T G_P v) with Gauss-Newton curvatures
    g_d, g_p = op("train_digit", "ggn"), op("train_pattern", "ggn")
    top_mix = eig["mix"].vectors[: cfg.n_top]
    x_mix = data["train_mix"][0]  # inputs only: no labels, no subset membership
    basis = eig["mix"].vectors[: cfg.ica_basis]
    ica_dirs, ica_info = separable_directions(
        model, params, x_mix, basis, n_components=cfg.n_top, seed=cfg.seed
    )
    cl_dirs, cl_info = cluster_directions(
        model,
        params,
        x_mix,
        eig["mix"].vectors[: cfg.cluster_basis],
        cfg.n_top,
        cfg.n_clusters,
        seed=cfg.seed,
    )
    eq_dirs, eq_info = equalised_directions(model, params, x_mix, cfg.n_top, seed=cfg.seed)
    # how well the discovered clusters match the hidden subsets (reported, never used)
    subset = torch.tensor(
        [0] * (len(x_mix) // 3) + [1] * (len(x_mix) // 3) + [2] * (len(x_mix) - 2 * (len(x_mix) // 3))
    )
    labels = cl_info.pop("labels")
    contingency = [
        [int(((labels == c) & (subset == s_)).sum()) for s_ in range(3)] for c in range(cfg.n_clusters)
    ]
    # balanced variant: each GGN scaled by its own top eigenvalue, so the weaker skill is not drowned out
    top_d = lanczos(g_d.matvec, g_d.dim, k=1, tol=1e-6, seed=cfg.seed, progress=False).values[0].item()
    top_p = lanczos(g_p.matvec, g_p.dim, k=1, tol=1e-6, seed=cfg.seed, progress=False).values[0].item()
    directions = {"mixed": top_mix, "ica": ica_dirs, "cluster": cl_dirs, "equalised": eq_dirs}
    curvatures = {name: (g_d.quadratics(v), g_p.quadratics(v)) for name, v in directions.items()}
    ratio = {name: specialisation(qd, qp) for name, (qd, qp) in curvatures.items()}
    balanced = {name: specialisation(qd / top_d, qp / top_p) for name, (qd, qp) in curvatures.items()}
    return {
        "r_mix_top": ratio["mixed"].tolist(),
        "r_ica": ratio["ica"].tolist(),
        "specialised_fraction_mixed": specialised_fraction(ratio["mixed"]),
        "specialised_fraction_unsupervised_method": specialised_fraction(ratio["ica"]),
        "r_cluster": ratio["cluster"].tolist(),
        "specialised_fraction_cluster_method": specialised_fraction(ratio["cluster"]),
        "cluster_info": {**cl_info, "clusters_x_hidden_subsets(blend,digit,pattern)": contingency},
        "n_pattern_specialised": {name: int((v < 0.1).sum()) for name, v in ratio.items()},
        "n_digit_specialised": {name: int((v > 0.9).sum()) for name, v in ratio.items()},
        "specialised_fraction_mixed_balanced": specialised_fraction(balanced["mixed"]),
        "specialised_fraction_unsupervised_method_balanced": specialised_fraction(balanced["ica"]),
        "specialised_fraction_cluster_method_balanced": specialised_fraction(balanced["cluster"]),
        "r_equalised": ratio["equalised"].tolist(),
        "specialised_fraction_equalised_method": specialised_fraction(ratio["equalised"]),
        "specialised_fraction_equalised_method_balanced": specialised_fraction(balanced["equalised"]),
        "equalised_info": {k: v for k, v in eq_info.items() if k != "concentration"},
        "ica_info": {k: v for k, v in ica_info.items() if k != "concentration"},
    }


def _blockwise(model, params, data, dirs, cfg: HybridConfig) -> dict:
    """Where each skill lives, layer by layer: the share of ||v||^2 of the pattern and digit directions in each
    layer, and the top eigenvalue of each layer's diagonal block of H_digit and H_pattern."""
    from steerlab.hessian.spectra import blockwise_spectra

    groups = layer_blocks(model)
    slices = block_slices(params)
    out: dict = {}
    for name, v in zip(("pattern_dir", "digit_dir"), dirs):
        total = float(v.pow(2).sum())
        out[f"{name}_share"] = {
            label: sum(float(v[sl].pow(2).sum()) for n, sl in slices.items() if re.search(pat, n)) / total
            for label, pat in groups.items()
        }
    for split in ("digit", "pattern"):
        spectra = blockwise_spectra(
            model, classification_task(), [data[f"train_{split}"]], groups, k=1, seed=cfg.seed, progress=False
        )
        out[f"top_eigenvalue_{split}"] = {label: v["values"][0] for label, v in spectra.items()}
    return out


ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # tempering exponents of the pre-registered round-1 candidates


class Candidate(NamedTuple):
    """A tempered-equalisation method: weights tr(G_i)^(-alpha); curvature ICA or not; the ICA works within
    the top-`basis` tempered eigenvectors (None: as many as directions wanted), on per-sample curvatures
    weighted by the same w_i if `weighted_ica`."""

    alpha: float
    ica: bool
    basis: int | None = None
    weighted_ica: bool = False

    @property
    def name(self) -> str:
        return (
            f"tempered_a{self.alpha:g}"
            + ("_ica" if self.ica else "")
            + (f"_m{self.basis}" if self.basis else "")
            + ("_wica" if self.weighted_ica else "")
        )


# the pre-registered candidate sets (docs/hessian.md)
ROUND1 = tuple(Candidate(a, ica) for a in ALPHAS for ica in (False, True))
ROUND2 = tuple(
    Candidate(a, True, m, wt) for a in (0.5, 0.75, 1.0) for m in (None, 40) for wt in (False, True)
)


def unsupervised_study(
    cfg: HybridConfig, candidates: tuple[Candidate, ...] = ROUND1, progress: bool = False
) -> dict:
    """Score mixed-data methods on one seed (same data and training as `run_seed`): the control (top
    `n_top` mixed-Hessian eigenvectors) and each tempered-equalisation `Candidate` (from the unlabelled
    mixed inputs only). Per method: r, balanced r (each GGN scaled by its top eigenvalue, computed with
    subset membership for scoring only), specialised fractions and counts of pattern-/digit-specialised
    directions; and the test-accuracy drops at +-`t` along every direction, beside `n_random` random unit
    directions."""
    t0 = time.perf_counter()
    data, model, losses = _trained(cfg)
    params = select_params(model)
    task = classification_task()

    def op(split: str, kind: str) -> CurvatureOperator:
        return CurvatureOperator(model, task, [data[split]], params, kind=kind, cache_graph=True)

    def top(o: CurvatureOperator, k: int):
        return lanczos(o.matvec, o.dim, k=k, which="LA", tol=cfg.lanczos_tol, seed=cfg.seed, progress=False)

    g_d, g_p = op("train_digit", "ggn"), op("train_pattern", "ggn")
    top_d, top_p = top(g_d, 1).values[0].item(), top(g_p, 1).values[0].item()
    x_mix = data["train_mix"][0]  # inputs only: no labels, no subset membership
    directions = {"mixed": top(op("train_mix", "hessian"), cfg.n_top).vectors[: cfg.n_top].double()}
    traces = per_sample_ggn_traces(model, params, x_mix)
    bases = {}  # one Lanczos run per alpha, as deep as its deepest candidate needs
    for alpha in dict.fromkeys(c.alpha for c in candidates):
        k = max((c.basis or cfg.n_top) if c.ica else cfg.n_top for c in candidates if c.alpha == alpha)
        bases[alpha] = tempered_basis(model, params, x_mix, alpha, k, cfg.seed, cfg.lanczos_tol, traces)
    infos = {}
    for c in tqdm(candidates, disable=not progress, desc=f"seed {cfg.seed} candidates"):
        vectors, w, info = bases[c.alpha]
        if c.ica:
            dirs, ica_info = separable_directions(
                model,
                params,
                x_mix,
                vectors[: c.basis or cfg.n_top],
                cfg.n_top,
                seed=cfg.seed,
                sample_weights=w if c.weighted_ica else None,
            )
            info = {**info, **{k: v for k, v in ica_info.items() if k != "concentration"}}
        else:
            dirs = vectors[: cfg.n_top]
        directions[c.name] = dirs
        infos[c.name] = info
    # every curvature product before any perturbation (the operators cache graphs of the current weights)
    curv = {name: (g_d.quadratics(v), g_p.quadratics(v)) for name, v in directions.items()}
    metrics = {
        "digit": lambda: accuracy(model, *data["test_digit"]),
        "pattern": lambda: accuracy(model, *data["test_pattern"]),
    }
    base = {name: fn() for name, fn in metrics.items()}

    def drops(v: torch.Tensor) -> dict[str, float]:  # accuracy drop at +-t along a unit direction
        at_t = perturbation_sweep(params, v, [cfg.t], metrics)
        return {m: base[m] - at_t[m][0] for m in metrics}

    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    random = [
        drops(r / r.norm()) for r in torch.randn(cfg.n_random, g_d.dim, generator=gen, dtype=torch.float64)
    ]
    methods = {}
    for name, v in directions.items():
        qd, qp = curv[name]
        d = [drops(u) for u in v]
        r, rb = specialisation(qd, qp), specialisation(qd / top_d, qp / top_p)
        methods[name] = {
            "r": r.tolist(),
            "r_balanced": rb.tolist(),
            "specialised_fraction": specialised_fraction(r),
            "specialised_fraction_balanced": specialised_fraction(rb),
            "n_pattern_specialised": int((r < 0.1).sum()),
            "n_pattern_specialised_balanced": int((rb < 0.1).sum()),
            "n_digit_specialised_balanced": int((rb > 0.9).sum()),
            # each direction's curvature in units of the subset's top eigenvalue (how curved, not just how skewed)
            "q_digit_rel": (np.abs(qd) / top_d).tolist(),
            "q_pattern_rel": (np.abs(qp) / top_p).tolist(),
            "digit_drop": [x["digit"] for x in d],
            "pattern_drop": [x["pattern"] for x in d],
        }
    return {
        "seed": cfg.seed,
        "arch": cfg.arch,
        "dim": g_d.dim,
        "final_train_loss": losses[-1],
        "base_accuracy": base,
        "t": cfg.t,
        "random_max_drop": max(max(x.values()) for x in random),
        "top_eigenvalue_ggn": {"digit": top_d, "pattern": top_p},
        "methods": methods,
        "candidates": {c.name: c._asdict() for c in candidates},
        "info": infos,
        "seconds": time.perf_counter() - t0,
    }


def choose_candidate(dev_runs: list[dict]) -> str:
    """The pre-registered rule: highest mean balanced fraction over the development runs; a tie (equal to 3
    decimals) goes to the smaller alpha, then to no ICA, then to unweighted ICA, then to the smaller basis.
    Never looks at anything but the dev runs."""
    candidates = {name: Candidate(**c) for name, c in dev_runs[0]["candidates"].items()}

    def key(name: str) -> tuple:
        mean = np.mean([r["methods"][name]["specialised_fraction_balanced"] for r in dev_runs])
        c = candidates[name]
        return (-round(float(mean), 3), c.alpha, c.ica, c.weighted_ica, c.basis or 0)

    return min(candidates, key=key)


SUMMARY_KEYS = (
    "pattern_drop_on_pattern_dir",
    "digit_drop_on_pattern_dir",
    "digit_drop_on_digit_dir",
    "pattern_drop_on_digit_dir",
    "random_dir_max_drop",
    "specialised_fraction_mixed",
    "specialised_fraction_unsupervised_method",
    "specialised_fraction_mixed_balanced",
    "specialised_fraction_unsupervised_method_balanced",
    "specialised_fraction_cluster_method",
    "specialised_fraction_cluster_method_balanced",
    "specialised_fraction_equalised_method",
    "specialised_fraction_equalised_method_balanced",
)


def summarise(runs: list[dict]) -> dict:
    """Mean and sd over seeds of the headline numbers; `random_dir_max_drop` is the max over seeds."""
    out: dict = {}
    for key in (k for k in SUMMARY_KEYS if k in runs[0]):
        vals = np.array([r[key] for r in runs], float)
        out[key] = float(vals.max() if key == "random_dir_max_drop" else vals.mean())
        out[f"{key}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    out["n_seeds"] = len(runs)
    return out


def run_experiment(seeds: list[int], cfg: HybridConfig | None = None, progress: bool = True) -> dict:
    cfg = cfg or HybridConfig()
    runs = []
    for seed in tqdm(seeds, disable=not progress, desc="hybrid digits seeds"):
        runs.append(run_seed(HybridConfig(**{**asdict(cfg), "seed": seed})))
    return {"config": asdict(cfg), "summary": summarise(runs), "runs": runs}
