"""steerlab.hessian against exact float64 Hessians of a tiny MLP and a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import tiny_model
from steerlab.hessian import (
    CurvatureOperator,
    Eigenpairs,
    SpectralDensity,
    classification_task,
    dense_matrix,
    flatten,
    hutchinson,
    hutchpp,
    lanczos,
    lanczos_tridiagonal,
    lm_task,
    perturbation_sweep,
    principal_angles,
    project_out,
    select_params,
    slq_density,
    specialisation,
)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5)).double()


def tiny_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (40,), generator=gen)
    return x, y


def exact_hessian(model, x, y, names):
    """torch.func.hessian of the full-data mean CE w.r.t. the named parameters (independent of our code)."""
    base = dict(model.named_parameters())
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]

    def loss(flat):
        chunks = torch.split(flat, sizes)
        params = {**base, **{n: c.view(s) for n, c, s in zip(names, chunks, shapes)}}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    flat = torch.cat([base[n].detach().reshape(-1) for n in names])
    return torch.func.hessian(loss)(flat)


@pytest.fixture(scope="module")
def mlp_case():
    model, (x, y) = tiny_mlp(), tiny_data()
    batches = [(x[:13], y[:13]), (x[13:], y[13:])]  # unequal batches: the weighting must be exact
    params = select_params(model)
    op = CurvatureOperator(model, classification_task(), batches, params, cache_graph=True)
    h = dense_matrix(op, progress=False)
    return model, x, y, batches, params, op, h


def test_dense_matches_torch_func_hessian(mlp_case):
    model, x, y, batches, params, op, h = mlp_case
    exact = exact_hessian(model, x, y, list(params))
    assert op.dim == 6 * 12 + 12 + 12 * 5 + 5
    assert torch.allclose(h, exact, atol=1e-12, rtol=0)
    uncached = CurvatureOperator(model, classification_task(), [(x, y)], params, cache_graph=False)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(uncached.matvec(v), exact @ v, atol=1e-12, rtol=0)


def test_parameter_subset_is_the_hessian_block(mlp_case):
    model, x, y, batches, params, op, h = mlp_case
    sub = select_params(model, include=r"^2\.")  # the second Linear only
    assert list(sub) == ["2.weight", "2.bias"]
    op2 = CurvatureOperator(model, classification_task(), batches, sub)
    block = dense_matrix(op2, progress=False)
    start = 6 * 12 + 12
    assert torch.allclose(block, h[start:, start:], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="no parameter matches"):
        select_params(model, include="nonexistent")


def test_ggn_matches_explicit_jacobian_product(mlp_case):
    model, x, y, batches, params, op, h = mlp_case
    names = list(params)
    base = dict(model.named_parameters())
    sizes = [base[n].numel() for n in names]

    def outputs(flat):
        chunks = torch.split(flat, sizes)
        p = {n: c.view(base[n].shape) for n, c in zip(names, chunks)}
        return functional_call(model, p, (x,))

    flat = flatten([base[n].detach() for n in names])
    jac = torch.func.jacrev(outputs)(flat)  # (N, C, P)
    prob = torch.softmax(outputs(flat), -1)
    hl = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, hl, jac) / len(x)
    gop = CurvatureOperator(model, classification_task(), batches, params, kind="ggn", cache_graph=True)
    g = dense_matrix(gop, progress=False)
    assert torch.allclose(g, ggn, atol=1e-12, rtol=0)
    assert torch.linalg.eigvalsh(g).min() > -1e-12  # PSD, unlike the Hessian
    assert torch.linalg.eigvalsh(h).min() < -1e-6


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_lanczos_top10_matches_exact(mlp_case, which):
    *_, op, h = mlp_case
    evals = torch.linalg.eigvalsh(h).numpy()
    k = 10
    expected = {
        "LA": evals[::-1][:k],
        "SA": evals[:k],
        "LM": evals[np.argsort(-np.abs(evals), kind="stable")][:k],
        "BE": np.concatenate([evals[::-1][:k], evals[:k]]),
    }[which]
    before = op.n_products
    res = lanczos(op.matvec, op.dim, k=k, which=which, tol=1e-10, progress=False)
    rel = np.abs(res.values.numpy() - expected) / np.abs(expected)
    assert rel.max() < 1e-6, (which, rel.max())
    assert res.n_products == op.n_products - before < op.dim
    true_res = (h @ res.vectors.T - res.vectors.T * res.values).norm(dim=0)
    assert torch.allclose(res.residuals, true_res, atol=1e-9)
    assert torch.allclose(
        res.vectors @ res.vectors.T, torch.eye(len(expected), dtype=torch.float64), atol=1e-8
    )


def test_eigenpairs_save_load(mlp_case, tmp_path):
    *_, op, h = mlp_case
    res = lanczos(op.matvec, op.dim, k=3, progress=False)
    res.meta["operator"] = op.describe()
    res.save(tmp_path)
    back = Eigenpairs.load(tmp_path)
    assert torch.equal(back.vectors, res.vectors) and back.n_products == res.n_products
    assert back.meta["operator"]["dim"] == op.dim
    assert not list(tmp_path.glob("*.tmp"))


def test_trace_estimates_cover_exact_trace(mlp_case):
    *_, op, h = mlp_case
    exact = float(torch.trace(h))
    for est in (
        hutchinson(op.matvec, op.dim, n_probes=60, seed=1, progress=False),
        hutchpp(op.matvec, op.dim, n_products=60, seed=1, progress=False),
    ):
        assert est.low <= exact <= est.high, (est.method, est.low, exact, est.high)
        assert est.high - est.low < 0.5 * abs(exact) + 1e-9
    pp = hutchpp(op.matvec, op.dim, n_products=60, seed=1, progress=False)
    hu = hutchinson(op.matvec, op.dim, n_probes=60, seed=1, progress=False)
    assert pp.stderr < hu.stderr  # deflation pays off on a decaying spectrum


def test_slq_density(mlp_case, tmp_path):
    *_, op, h = mlp_case
    evals = torch.linalg.eigvalsh(h).numpy()
    dens = slq_density(op.matvec, op.dim, n_probes=3, steps=30, seed=0, progress=False)
    for nodes, weights in zip(dens.nodes, dens.weights):
        assert abs(weights.sum() - 1) < 1e-12
        assert nodes.min() >= evals[0] - 1e-9 and nodes.max() <= evals[-1] + 1e-9
    assert abs(dens.nodes[0].max() - evals[-1]) < 1e-8  # extreme Ritz values converge first
    grid, d = dens.smooth()
    assert abs(np.trapezoid(d, grid) - 1) < 1e-3
    assert abs(dens.moment(1) - evals.mean()) < 0.2 * np.abs(evals).mean()
    # quadrature is exact for polynomials of degree <= 2*steps-1, per probe
    q = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = lanczos_tridiagonal(op.matvec, q, 12)
    t = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
    theta, s = np.linalg.eigh(t)
    for p in (1, 2, 5, 9):
        exact = float(q @ torch.linalg.matrix_power(h, p) @ q / (q @ q))
        assert abs(np.sum(s[0] ** 2 * theta**p) - exact) < 1e-8 * max(1.0, abs(exact))
    dens.save(tmp_path)
    assert np.allclose(SpectralDensity.load(tmp_path).nodes[1], dens.nodes[1])


def test_subspace_tools(mlp_case):
    model, x, y, batches, params, op, h = mlp_case
    e = torch.eye(5, dtype=torch.float64)
    angles = principal_angles(e[:2], torch.stack([e[1], (e[2] + e[3]) / 2**0.5]))
    assert np.allclose(angles, [0, np.pi / 2])
    v = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    w = project_out(v, e[:2])
    assert torch.allclose(w[:2], torch.zeros(2, dtype=torch.float64)) and abs(w.norm() - v.norm()) < 1e-12
    before = flatten(list(params.values())).clone()
    direction = torch.randn(op.dim, dtype=torch.float64)

    def loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    out = perturbation_sweep(params, direction, [0.0, 0.1], {"loss": loss})
    assert torch.equal(flatten(list(params.values())), before)  # exactly restored
    assert out["loss"][0] == pytest.approx(loss())
    # ±t averaging cancels the gradient term: average ≈ L + t^2/2 v^T H v
    t = 1e-3
    expected = loss() + 0.5 * t**2 * float(direction @ h @ direction)
    assert perturbation_sweep(params, direction, [t], {"loss": loss})["loss"][0] == pytest.approx(
        expected, rel=1e-9
    )
    assert np.allclose(specialisation([1, 0, 3], [1, 2, 1]), [0.5, 0.0, 0.75])


def test_subsample_spectra_and_hessian_vs_ggn(mlp_case):
    from steerlab.hessian import blockwise_spectra, hessian_vs_ggn, subsample_spectra

    model, x, y, batches, params, op, h = mlp_case
    small = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    sub = subsample_spectra(
        model, classification_task(), small, params, k=3, n_subsamples=4, seed=0, progress=False, tol=1e-10
    )
    assert len(sub["values"]) == 4 and all(s > 0 for s in sub["sd"])
    # each row is the exact spectrum of its own subset (checked on one subset by the dense matrix)
    blocks = blockwise_spectra(
        model,
        classification_task(),
        batches,
        {"first": r"^0\.", "second": r"^2\."},
        k=2,
        progress=False,
        tol=1e-10,
    )
    n0 = 6 * 12 + 12
    assert np.allclose(
        blocks["first"]["values"], torch.linalg.eigvalsh(h[:n0, :n0]).numpy()[::-1][:2], rtol=1e-8
    )
    assert np.allclose(
        blocks["second"]["values"], torch.linalg.eigvalsh(h[n0:, n0:]).numpy()[::-1][:2], rtol=1e-8
    )
    cmp = hessian_vs_ggn(model, classification_task(), batches, params, k=3, progress=False, tol=1e-10)
    assert np.allclose(cmp["hessian_top"], torch.linalg.eigvalsh(h).numpy()[::-1][:3], rtol=1e-8)
    assert cmp["hessian_bottom"][0] < 0 < min(cmp["ggn_top"])


def test_tiny_llama_eager_top_eigenpairs():
    from conftest import char_tokenizer
    from steerlab.hessian import lm_batches

    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    tok = char_tokenizer()
    batches = lm_batches(
        tok, ["hello world, curvature!", "the loss basin", "eigen"], batch_size=2, max_length=24
    )
    params = select_params(model, include=[r"layers\.3\.self_attn\.v_proj", r"layers\.3\.input_layernorm"])
    op = CurvatureOperator(model, lm_task(), batches, params, cache_graph=True)
    h = dense_matrix(op, progress=False)
    assert model.config._attn_implementation == "sdpa"  # restored after each product
    # independent check of one column block: torch.func Hessian-vector product (forward-over-reverse)
    names = list(params)
    base = dict(model.named_parameters())
    sizes = [base[n].numel() for n in names]
    task = lm_task()
    weights = torch.tensor([task.weight(b) for b in batches], dtype=torch.float64)

    def loss(flat):
        chunks = torch.split(flat, sizes)
        p = {**base, **{n: c.view(base[n].shape) for n, c in zip(names, chunks)}}
        model.set_attn_implementation("eager")
        total = sum(
            w * task.loss(functional_call(model, p, (), dict(b)).logits, b) for w, b in zip(weights, batches)
        )
        return total / weights.sum()

    flat = flatten([base[n].detach() for n in names])
    v = torch.randn(op.dim, dtype=torch.float64)
    _, hv = torch.func.jvp(torch.func.grad(loss), (flat,), (v,))
    model.set_attn_implementation("sdpa")
    # HF eager attention runs its softmax in float32, so float64 agreement is ~1e-8, not 1e-15
    assert torch.allclose(h @ v, hv.detach(), rtol=0, atol=1e-6 * float(hv.abs().max()))
    evals = torch.linalg.eigvalsh(h).numpy()
    before = op.n_products
    res = lanczos(op.matvec, op.dim, k=5, which="BE", tol=1e-10, progress=False)
    assert res.n_products == op.n_products - before
    expected = np.concatenate([evals[::-1][:5], evals[:5]])
    assert (np.abs(res.values.numpy() - expected) / np.abs(expected)).max() < 1e-6
    # GGN operator runs on the transformer too and is PSD
    gop = CurvatureOperator(model, lm_task(), batches, params, kind="ggn")
    u = torch.randn(op.dim, dtype=torch.float64)
    assert gop.quadratic(u) > 0


def test_part_without_layers_selects_that_part_of_every_decoder_layer():
    from steerlab.hessian.lm import layer_params

    model = tiny_model("llama")
    n = model.config.num_hidden_layers
    chosen = layer_params(model, None, "attention")
    expected = {
        name
        for name, _ in model.named_parameters()
        if ".self_attn." in name and name.startswith("model.layers.")
    }
    assert set(chosen) == expected
    assert {int(name.split(".")[2]) for name in chosen} == set(range(n))
    assert set(layer_params(model, None, "mlp")) == {
        name for name, _ in model.named_parameters() if ".mlp." in name
    }
    assert set(layer_params(model, None, "mlp")) == set(layer_params(model, list(range(n)), "mlp"))
