"""HappyFaces (Aligned AI 2022): separate a CNN's reliance on the face from its reading of the writing.

A small CNN is trained on the labeled set only, where the face's expression and the red "HAPPY"/"SAD"
writing always agree. Probe data are built from the same labeled images, never from the validation set:

* *face probe*: the writing band (the bottom rows, where the red writing lies in the labeled images) is
  replaced by the mean band of all labeled images (label-neutral: 100 of each class), label = face;
* *text probe*: everything above the band is replaced by the mean image there, label = writing;
* *swapped*: each image keeps its face and gets the band of an image of the other class, so face and
  writing disagree (a synthetic cross type), labelled with both.

Curvature (Hessian or GGN of the CE loss, all weights) on the face and text probes gives v_face = top
eigenvector of H_face with the top-k eigenvectors of H_text projected out (and vice versa). Each
direction's size t is the smallest of a grid whose ±t mean raises its own probe loss by `target_nats`
(chosen on probe data); random directions of the same norm are the control. The validation set is used
only to measure: accuracy against the face labels and against the writing labels (200 images), and
which feature the model follows on the cross types (face happy + "SAD", face sad + "HAPPY").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from steerlab.data.images import LabelledFaces
from steerlab.hessian.lanczos import lanczos
from steerlab.hessian.operator import CurvatureOperator
from steerlab.hessian.params import block_slices, select_params
from steerlab.hessian.subspace import perturbed, principal_angles, project_out
from steerlab.hessian.tasks import accuracy, classification_task, train_classifier


@dataclass(frozen=True)
class HappyFacesConfig:
    """Everything fixed before the reported seeds are run."""

    seed: int = 0
    size: int = 32
    channels: tuple[int, int, int] = (8, 16, 16)
    train_steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-4
    band: float = 0.8  # the writing lies in rows >= band * size (measured on the labeled images)
    kind: str = "hessian"
    dtype: str = "float32"  # model, training and products; the products are summed in float64
    k_project: int = 10
    lanczos_tol: float = 1e-4
    target_nats: float = 0.5  # a direction's size: its own probe loss rises by this much (mean over +-t)
    t_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    n_random: int = 10


def make_cnn(
    channels: tuple[int, int, int] = (8, 16, 16),
    n_classes: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Module:
    """Three 3x3 conv layers (ReLU, 2x2 max-pool after the first two), global average pool, linear."""
    torch.manual_seed(seed)
    c1, c2, c3 = channels
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c3, n_classes),
    ).to(dtype)


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def probe_sets(faces: LabelledFaces, band: float, seed: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """`face` (writing masked, face labels), `text` (face masked, writing labels) and `swapped`
    (x, face labels, writing labels) from labeled images whose face and writing agree."""
    x = faces.images.double()
    y = faces.face
    if not torch.equal(faces.face, faces.text):
        raise ValueError("probe sets are built from labeled images whose face and writing agree")
    start = int(band * x.shape[-2])
    mean = x.mean(0)
    text_masked = x.clone()
    text_masked[:, :, start:] = mean[:, start:]
    face_masked = x.clone()
    face_masked[:, :, :start] = mean[:, :start]
    gen = torch.Generator().manual_seed(seed)
    swapped = x.clone()
    for label in (0, 1):
        mine = (y == label).nonzero().flatten()
        other = (y != label).nonzero().flatten()
        donors = other[torch.randint(len(other), (len(mine),), generator=gen)]
        swapped[mine, :, start:] = x[donors, :, start:]
    return {"face": (text_masked, y), "text": (face_masked, y), "swapped": (swapped, y, 1 - y)}


def validation_metrics(model: nn.Module, val: LabelledFaces) -> dict[str, float]:
    """Accuracy against the face and writing labels, and the face-following rate on the cross types."""
    with torch.no_grad():
        pred = model(val.images).argmax(-1)
    cross = val.face != val.text
    return {
        "face_acc": float((pred == val.face).double().mean()),
        "text_acc": float((pred == val.text).double().mean()),
        "cross_follow_face": float((pred[cross] == val.face[cross]).double().mean()),
    }


def _mean_pm(params, delta: torch.Tensor, fn) -> dict[str, float]:
    """fn() at theta + delta and theta - delta, averaged (eigenvector signs are arbitrary)."""
    out: dict[str, float] = {}
    for sign in (1.0, -1.0):
        with perturbed(params, sign * delta):
            for key, value in fn().items():
                out[key] = out.get(key, 0.0) + value / 2
    return out


def layer_shares(v: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, float]:
    """Fraction of ||v||^2 in each parameter tensor."""
    total = float(v.double().pow(2).sum())
    return {name: float(v[s].double().pow(2).sum()) / total for name, s in block_slices(params).items()}


def run_seed(cfg: HappyFacesConfig, labeled: LabelledFaces, val: LabelledFaces) -> dict:
    """Train on `labeled`, build the probes, find the directions and measure them on `val`."""
    t0 = time.perf_counter()
    dtype = getattr(torch, cfg.dtype)
    probes = {
        name: (x.to(dtype), *labels) for name, (x, *labels) in probe_sets(labeled, cfg.band, cfg.seed).items()
    }
    val = LabelledFaces(val.images.to(dtype), val.names, val.source, val.face, val.text, val.tags)
    model = make_cnn(cfg.channels, seed=cfg.seed, dtype=dtype)
    losses = train_classifier(
        model, labeled.images.to(dtype), labeled.face, cfg.train_steps, cfg.lr, cfg.weight_decay
    )
    params = select_params(model)
    task = classification_task()
    eig = {}
    for name in ("face", "text"):
        op = CurvatureOperator(model, task, [probes[name]], params, kind=cfg.kind, cache_graph=True)
        eig[name] = lanczos(
            op.matvec, op.dim, k=cfg.k_project, tol=cfg.lanczos_tol, seed=cfg.seed, progress=False
        )
    dim = eig["face"].vectors.shape[1]
    dirs = {
        "face": project_out(eig["face"].vectors[0], eig["text"].vectors[: cfg.k_project]),
        "text": project_out(eig["text"].vectors[0], eig["face"].vectors[: cfg.k_project]),
    }

    def probe_view() -> dict[str, float]:
        xs, yf, yt = probes["swapped"]
        return {
            "face_probe_loss": mean_loss(model, *probes["face"]),
            "text_probe_loss": mean_loss(model, *probes["text"]),
            "face_probe_acc": accuracy(model, *probes["face"]),
            "text_probe_acc": accuracy(model, *probes["text"]),
            "swapped_follow_face": accuracy(model, xs, yf),
        }

    base_probe = probe_view()
    base_val = validation_metrics(model, val)
    # size of each direction: chosen on probe data only
    sizes, grid = {}, {}
    for name, v in dirs.items():
        grid[name] = []
        for t in cfg.t_grid:
            row = {"t": t, **_mean_pm(params, t * v, probe_view)}
            grid[name].append(row)
            if row[f"{name}_probe_loss"] - base_probe[f"{name}_probe_loss"] >= cfg.target_nats:
                break
        sizes[name] = grid[name][-1]["t"]
    changes = {}
    for name, v in dirs.items():
        at = _mean_pm(params, sizes[name] * v, lambda: validation_metrics(model, val))
        for metric in ("face", "text"):
            changes[f"{name}_dir_{metric}_change"] = at[f"{metric}_acc"] - base_val[f"{metric}_acc"]
        changes[f"{name}_dir_cross_follow_face_change"] = (
            at["cross_follow_face"] - base_val["cross_follow_face"]
        )
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    random_changes = []
    for i in range(cfg.n_random):
        r = torch.randn(dim, generator=gen, dtype=torch.float64)
        t = sizes["face" if i % 2 == 0 else "text"]  # half at each targeted direction's norm
        at = _mean_pm(params, t * r / r.norm(), lambda: validation_metrics(model, val))
        random_changes.append({k: at[k] - base_val[k] for k in base_val})
    heads = two_heads(model, params, dirs, probes, cfg.t_grid)
    head_val = {}
    for feature, (name, t, sign) in heads.items():
        with perturbed(params, sign * t * dirs[name] if t else torch.zeros(dim, dtype=torch.float64)):
            head_val[feature] = validation_metrics(model, val)[f"{feature}_acc"]
    return {
        "seed": cfg.seed,
        "dim": dim,
        "final_train_loss": losses[-1],
        "base_probe": base_probe,
        "base_validation": base_val,
        "sizes": sizes,
        "size_grid": grid,
        **changes,
        "random_changes": random_changes,
        "random_max_change": max(
            abs(v) for c in random_changes for k, v in c.items() if k != "cross_follow_face"
        ),
        "heads": {f: {"direction": n, "t": t, "sign": s} for f, (n, t, s) in heads.items()},
        "head_validation_acc": head_val,
        "worst_head_acc": min(head_val.values()),
        "base_worst_head_acc": min(base_val["face_acc"], base_val["text_acc"]),
        "eigenvalues": {n: e.values.tolist() for n, e in eig.items()},
        "hvp_counts": {n: e.n_products for n, e in eig.items()},
        "principal_angles_face_vs_text_deg": np.degrees(
            principal_angles(eig["face"].vectors, eig["text"].vectors)
        ).tolist(),
        "layer_shares": {n: layer_shares(v, params) for n, v in dirs.items()},
        "seconds": time.perf_counter() - t0,
    }


def two_heads(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    dirs: dict[str, torch.Tensor],
    probes: dict[str, tuple[torch.Tensor, ...]],
    t_grid: tuple[float, ...],
) -> dict[str, tuple[str, float, float]]:
    """Two heads from one model: the face head moves along the *text* direction (to stop reading the
    writing), the text head along the *face* direction; for each, (t, sign) maximise the agreement with
    that feature's labels on the synthetic swapped images (t = 0, the unperturbed model, included)."""
    xs, yf, yt = probes["swapped"]
    out = {}
    for feature, name, labels in (("face", "text", yf), ("text", "face", yt)):
        best = (accuracy(model, xs, labels), 0.0, 1.0)
        for t in t_grid:
            for sign in (1.0, -1.0):
                with perturbed(params, sign * t * dirs[name]):
                    acc = accuracy(model, xs, labels)
                if acc > best[0]:
                    best = (acc, t, sign)
        out[feature] = (name, best[1], best[2])
    return out


SUMMARY_KEYS = (
    "face_dir_face_change",
    "face_dir_text_change",
    "text_dir_text_change",
    "text_dir_face_change",
    "face_dir_cross_follow_face_change",
    "text_dir_cross_follow_face_change",
    "random_max_change",
    "worst_head_acc",
    "base_worst_head_acc",
)


def summarise(runs: list[dict]) -> dict:
    """Mean, sd and a 95% Student-t interval over seeds; `random_max_change` is the max over seeds."""
    from scipy import stats

    out: dict = {"n_seeds": len(runs)}
    for key in SUMMARY_KEYS:
        vals = np.array([r[key] for r in runs], float)
        if key == "random_max_change":
            out[key] = float(vals.max())
            continue
        out[key] = float(vals.mean())
        sd = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        half = float(stats.t.ppf(0.975, len(vals) - 1) * sd / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
        out[f"{key}_sd"] = sd
        out[f"{key}_ci95"] = [out[key] - half, out[key] + half]
    return out


def run_experiment(
    labeled: LabelledFaces,
    val: LabelledFaces,
    seeds: list[int],
    cfg: HappyFacesConfig | None = None,
    progress: bool = True,
) -> dict:
    cfg = cfg or HappyFacesConfig()
    runs = [
        run_seed(HappyFacesConfig(**{**asdict(cfg), "seed": s}), labeled, val)
        for s in tqdm(seeds, disable=not progress, desc="happyfaces seeds")
    ]
    return {"config": asdict(cfg), "summary": summarise(runs), "runs": runs}
