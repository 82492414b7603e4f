"""Lanczos with a float32 or file-backed Krylov basis against the exact spectrum of a small Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from steerlab.hessian import lanczos, lanczos_tridiagonal
from steerlab.hessian.lanczos import KrylovBasis


@pytest.fixture(scope="module")
def exact_h():
    """The exact float64 Hessian (torch.func.hessian) of a tiny trained MLP's mean CE (916 parameters)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (60,), generator=gen)
    model = nn.Sequential(
        nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    base = dict(model.named_parameters())
    names = list(base)
    sizes = [base[n].numel() for n in names]

    def loss(flat):
        chunks = torch.split(flat, sizes)
        params = {n: c.view(base[n].shape) for n, c in zip(names, chunks)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in base.values()])
    return torch.func.hessian(loss)(flat)


@pytest.mark.parametrize(
    ("dtype", "on_disk", "bound"),
    [(torch.float64, True, 1e-10), (torch.float32, False, 1e-6), (torch.float32, True, 1e-6)],
)
def test_low_memory_basis_matches_exact_spectrum(exact_h, tmp_path, dtype, on_disk, bound):
    h = exact_h
    evals = torch.linalg.eigvalsh(h).numpy()
    expected = np.concatenate([evals[::-1][:8], evals[:8]])
    res = lanczos(
        lambda v: h @ v,
        h.shape[0],
        k=8,
        which="BE",
        tol=1e-9 if dtype == torch.float64 else 1e-6,
        progress=False,
        basis_dtype=dtype,
        basis_dir=tmp_path / "krylov" if on_disk else None,
    )
    rel = np.abs(res.values.numpy() - expected) / np.abs(evals).max()
    assert rel.max() < bound, rel.max()
    true_res = (h @ res.vectors.T - res.vectors.T * res.values).norm(dim=0)
    assert true_res.max() < 1e3 * bound * np.abs(evals).max()
    if on_disk:
        assert not list((tmp_path / "krylov").iterdir())  # the basis file is removed


def test_float64_file_basis_is_the_in_memory_computation(exact_h, tmp_path):
    h = exact_h
    ram = lanczos(lambda v: h @ v, h.shape[0], k=5, tol=1e-10, progress=False)
    disk = lanczos(lambda v: h @ v, h.shape[0], k=5, tol=1e-10, progress=False, basis_dir=tmp_path)
    assert ram.n_products == disk.n_products
    assert torch.allclose(ram.values, disk.values, rtol=1e-12, atol=0)
    assert torch.allclose(ram.vectors, disk.vectors, atol=1e-10)


def test_krylov_basis_products_in_chunks(tmp_path):
    gen = torch.Generator().manual_seed(1)
    rows = torch.linalg.qr(torch.randn(50, 7, generator=gen, dtype=torch.float64))[0].T  # 7 orthonormal rows
    w = torch.randn(50, generator=gen, dtype=torch.float64)
    coeffs = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    for folder in (None, tmp_path):
        basis = KrylovBasis(50, 7, torch.float64, folder, chunk_bytes=8 * 50 * 2)  # two rows per chunk
        for q in rows:
            basis.append(q)
        assert basis.chunk == 2 and basis.nbytes() == 7 * 50 * 8
        assert torch.allclose(basis.project(w), rows @ w, atol=1e-14)
        assert torch.allclose(basis.combine(coeffs), coeffs @ rows, atol=1e-14)
        assert basis.orthogonalise(w) @ rows.T == pytest.approx(np.zeros(7), abs=1e-13)
        with pytest.raises(ValueError, match="full"):
            basis.append(rows[0])
        basis.close()


def test_slq_tridiagonal_unchanged(exact_h):
    """The quadrature's tridiagonal with the shared basis store equals one built from explicit Gram-Schmidt."""
    h = exact_h
    v0 = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, b = lanczos_tridiagonal(lambda v: h @ v, v0, 15)
    q, qs, prev, beta = v0 / v0.norm(), [], torch.zeros_like(v0), 0.0
    ref_a, ref_b = [], []
    for j in range(15):
        qs.append(q)
        w = h @ q
        ref_a.append(float(w @ q))
        w = w - ref_a[-1] * q - beta * prev
        for _ in range(2):
            basis = torch.stack(qs)
            w = w - basis.T @ (basis @ w)
        beta = float(w.norm())
        if j < 14:
            ref_b.append(beta)
        prev, q = q, w / beta
    assert np.allclose(a, ref_a, rtol=1e-10) and np.allclose(b, ref_b, rtol=1e-10)
