"""Hybrid-digits experiment and the unsupervised curvature-ICA method."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from steerlab.hessian.separate import curvature_ica

pytest.importorskip("sklearn")


def test_curvature_ica_recovers_planted_blocks():
    """Samples of two kinds curve two generic (non-orthogonal) 3-d subspaces of R^6. Without knowing which
    sample is which, every output direction must carry curvature from one kind of sample only."""
    gen = torch.Generator().manual_seed(0)
    blocks = (
        torch.randn(6, 3, generator=gen, dtype=torch.float64),
        torch.randn(6, 3, generator=gen, dtype=torch.float64),
    )
    a, group = [], []
    for i in range(400):
        j = blocks[i % 2] @ torch.randn(3, 2, generator=gen, dtype=torch.float64)
        a.append(j @ j.T)
        group.append(i % 2)
    a, group = torch.stack(a), torch.tensor(group)

    def share_of_group0(directions):
        c = torch.einsum("jm,nmk,jk->nj", directions, a, directions)
        return c[group == 0].sum(0) / c.sum(0)

    coeffs, conc, info = curvature_ica(a, seed=1)
    r = share_of_group0(coeffs)
    assert ((r < 1e-8) | (r > 1 - 1e-8)).all(), r
    assert int((r > 0.5).sum()) == 3
    # the eigenvectors of the summed curvature are mixtures: the baseline the method must beat
    _, evecs = torch.linalg.eigh(a.sum(0))
    r_eig = share_of_group0(evecs.T)
    assert ((r_eig > 0.1) & (r_eig < 0.9)).sum() >= 3


@pytest.fixture(scope="module")
def hybrid_seed0():
    from steerlab.hessian.hybrid import HybridConfig, run_seed

    return run_seed(HybridConfig(seed=0))


def test_hybrid_digits_targeted_perturbation(hybrid_seed0):
    r = hybrid_seed0
    assert r["base_accuracy"]["digit"] > 0.9 and r["base_accuracy"]["pattern"] > 0.95
    assert r["pattern_drop_on_pattern_dir"] >= 3 * r["digit_drop_on_pattern_dir"]
    assert r["digit_drop_on_digit_dir"] >= 3 * r["pattern_drop_on_digit_dir"]
    assert r["random_dir_max_drop"] <= 0.03
    assert max(r["max_rel_residual"].values()) < 1e-6
    assert len(r["r_mix_top"]) == len(r["r_ica"]) == 20
    assert np.all((np.array(r["r_ica"]) >= 0) & (np.array(r["r_ica"]) <= 1))
    # the sweep is ±t averaged and starts at the unperturbed accuracy
    assert r["sweeps"]["pattern_dir"]["pattern"][0] == pytest.approx(r["base_accuracy"]["pattern"])


def test_per_sample_traces_and_equalised_ggn_are_exact():
    from torch import nn

    from steerlab.hessian import CurvatureOperator, classification_task, dense_matrix, select_params
    from steerlab.hessian.separate import equalised_ggn_task, per_sample_ggn_traces

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    params = select_params(model)
    per_sample = [
        dense_matrix(
            CurvatureOperator(
                model, classification_task(), [(x[i : i + 1], torch.tensor([0]))], params, kind="ggn"
            ),
            progress=False,
        )
        for i in range(len(x))
    ]
    traces = per_sample_ggn_traces(model, params, x, chunk=4)
    assert torch.allclose(traces, torch.stack([g.trace() for g in per_sample]), rtol=1e-10)
    w = torch.rand(len(x), dtype=torch.float64) + 0.1
    q = torch.softmax(model(x), -1).detach()
    op = CurvatureOperator(model, equalised_ggn_task(), [(x, q, w)], params, kind="ggn")
    expected = sum(wi * g for wi, g in zip(w, per_sample)) / w.sum()
    assert torch.allclose(dense_matrix(op, progress=False), expected, atol=1e-12)


def test_separate_hybrid_digits_command(hybrid_seed0, tmp_path, capsys, monkeypatch):
    """CLI wiring: JSON, summary line and report (the seed's computation is shared with the test above)."""
    import steerlab.hessian.hybrid as hybrid
    from steerlab.cli import main

    monkeypatch.setattr(hybrid, "run_seed", lambda cfg: {**hybrid_seed0, "seed": cfg.seed})
    assert main(["hessian", "separate", "--seeds", "0", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_seeds"] == 2 and summary["specialised_fraction_unsupervised_method_sd"] == 0
    assert summary["pattern_drop_on_pattern_dir"] == pytest.approx(
        hybrid_seed0["pattern_drop_on_pattern_dir"]
    )
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64") == 3
    for name in ("sweeps", "specialisation", "spectra"):
        png = (tmp_path / f"hybrid_{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and base64.b64encode(png).decode() in html
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    saved = json.loads((tmp_path / "hybrid_digits.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1]


def test_hybrid_cnn_runs_with_blockwise_shares():
    """The CNN variant: 2 886 parameters, per-layer shares of each direction sum to 1, block spectra per layer."""
    from steerlab.hessian.hybrid import HybridConfig, layer_blocks, make_cnn, run_seed

    cfg = HybridConfig(
        seed=0,
        arch="cnn",
        unsupervised=False,
        train_steps=20,
        k_project=2,
        n_random=1,
        sweep=(0.0, 1.0),
        lanczos_tol=1e-4,
    )
    assert sum(p.numel() for p in make_cnn(cfg).parameters()) == 2886
    assert layer_blocks(make_cnn(cfg)) == {"layer1": r"^1\.", "layer3": r"^3\.", "layer7": r"^7\."}
    r = run_seed(cfg)
    assert r["arch"] == "cnn" and r["dim"] == 2886 and "r_ica" not in r
    for name in ("pattern_dir_share", "digit_dir_share"):
        assert sum(r["blockwise"][name].values()) == pytest.approx(1.0)
    assert set(r["blockwise"]["top_eigenvalue_digit"]) == {"layer1", "layer3", "layer7"}
    assert len(r["random_sweep_max_drop"]) == 2 and r["random_sweep_max_drop"][0] == 0.0
