"""Lanczos with full reorthogonalisation: top-k eigenpairs at either end, with exact residuals."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from steerlab.io import load_result, save_result

Which = Literal["LA", "SA", "LM", "BE"]
MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Eigenpairs:
    """Ritz pairs of a symmetric operator. `vectors` is (k, dim); `residuals[i] = ||A v_i - lambda_i v_i||`."""

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    n_products: int
    which: str
    meta: dict = field(default_factory=dict)

    def save(self, folder, name: str = "eigenpairs") -> None:
        tensors = {"values": self.values, "vectors": self.vectors, "residuals": self.residuals}
        meta = {"n_products": self.n_products, "which": self.which, **self.meta}
        meta["values"] = self.values.tolist()
        meta["residuals"] = self.residuals.tolist()
        save_result(Path(folder) / name, tensors, meta, kind="Eigenpairs")

    @classmethod
    def load(cls, folder, name: str = "eigenpairs") -> Eigenpairs:
        t, meta = load_result(Path(folder) / name, kind="Eigenpairs")
        n, which = meta.pop("n_products"), meta.pop("which")
        meta.pop("values", None), meta.pop("residuals", None)
        return cls(t["values"], t["vectors"], t["residuals"], n, which, meta)


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices into ascending `theta` of the wanted Ritz values, in reporting order."""
    m = len(theta)
    k = min(k, m)
    if which == "LA":
        return np.arange(m - 1, m - 1 - k, -1)
    if which == "SA":
        return np.arange(k)
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    if which == "BE":
        top = list(range(m - 1, m - 1 - k, -1))
        bottom = [i for i in range(k) if i not in top]
        return np.array(top + bottom)
    raise ValueError(f"which must be LA, SA, LM or BE, not {which!r}")


class KrylovBasis:
    """The rows q_0, q_1, ... of a Lanczos basis, stored in RAM or in a file, as float64 or float32.

    Every product with the basis is computed in float64, a few rows at a time (at most `chunk_bytes` of
    float64 rows), so the only large allocation is the storage itself: `rows x dim x 4` bytes for float32.
    With `folder`, rows are appended to a file there and read back in chunks with ordinary reads, so they
    live in the operating system's page cache rather than in the process (its peak RSS stays a few
    vectors); the file is removed by `close`.
    """

    def __init__(
        self,
        dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float64,
        folder: str | Path | None = None,
        chunk_bytes: int = 2**24,
    ) -> None:
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"basis dtype must be torch.float64 or torch.float32, not {dtype}")
        self.dim, self.capacity, self.dtype, self.rows = dim, capacity, dtype, 0
        self.chunk = max(1, chunk_bytes // (8 * dim))
        self._np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self._itemsize = np.dtype(self._np_dtype).itemsize
        self._file = None
        self._data = None
        self._buf: torch.Tensor | None = None
        self._raw: np.ndarray | None = None
        if folder is None:
            self._data = torch.empty(capacity, dim, dtype=dtype)  # pages are touched only as rows are written
        else:
            import tempfile

            Path(folder).mkdir(parents=True, exist_ok=True)
            self._file = tempfile.NamedTemporaryFile(dir=folder, prefix="krylov-", suffix=".bin")

    def append(self, q: torch.Tensor) -> None:
        if self.rows == self.capacity:
            raise ValueError(f"basis is full ({self.capacity} rows)")
        if self._data is not None:
            self._data[self.rows] = q
        else:
            self._file.seek(self.rows * self.dim * self._itemsize)
            self._file.write(q.to(self.dtype).numpy().tobytes())
            self._file.flush()
        self.rows += 1

    def _chunks(self, rows: int):
        """(start, float64 tensor of rows start..start+n) over the first `rows` rows.

        Rows that are not float64 in RAM are converted into one reused float64 buffer (no allocation per
        chunk); a yielded block is only valid until the next one."""
        for start in range(0, rows, self.chunk):
            n = min(self.chunk, rows - start)
            if self._data is not None and self.dtype == torch.float64:
                yield start, self._data[start : start + n]
                continue
            if self._buf is None:
                self._buf = torch.empty(self.chunk, self.dim, dtype=torch.float64)
            if self._data is not None:
                self._buf[:n].copy_(self._data[start : start + n])
            else:
                if self._raw is None:
                    self._raw = np.empty(self.chunk * self.dim, dtype=self._np_dtype)
                self._file.seek(start * self.dim * self._itemsize)
                got = self._file.readinto(memoryview(self._raw[: n * self.dim]).cast("B"))
                if got != n * self.dim * self._itemsize:
                    raise OSError(f"short read from the basis file {self._file.name}")
                self._buf[:n].copy_(torch.from_numpy(self._raw[: n * self.dim]).view(n, self.dim))
            yield start, self._buf[:n]

    def project(self, w: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """B w over the first `rows` rows (float64)."""
        rows = self.rows if rows is None else rows
        out = torch.empty(rows, dtype=torch.float64)
        for start, block in self._chunks(rows):
            out[start : start + len(block)] = block @ w
        return out

    def combine(self, coeffs: torch.Tensor) -> torch.Tensor:
        """coeffs @ B for coeffs (k, rows): k float64 vectors of length dim."""
        coeffs = torch.as_tensor(coeffs, dtype=torch.float64)
        out = torch.zeros(coeffs.shape[0], self.dim, dtype=torch.float64)
        for start, block in self._chunks(coeffs.shape[1]):
            out += coeffs[:, start : start + len(block)] @ block
        return out

    def orthogonalise(self, w: torch.Tensor) -> torch.Tensor:
        """Classical Gram-Schmidt against every stored row, repeated once only if the norm collapsed (DGKS)."""
        before = w.norm()
        w = w - self.combine(self.project(w)[None])[0]
        if w.norm() < 0.7071 * before:
            w = w - self.combine(self.project(w)[None])[0]
        return w

    def nbytes(self) -> int:
        return self.rows * self.dim * self._itemsize

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._data = self._buf = self._raw = None


def lanczos(
    matvec: MatVec,
    dim: int,
    k: int = 10,
    which: Which = "LA",
    tol: float = 1e-6,
    max_iter: int = 200,
    min_iter: int | None = None,
    check_every: int = 1,
    seed: int = 0,
    v0: torch.Tensor | None = None,
    progress: bool = True,
    basis_dtype: torch.dtype = torch.float64,
    basis_dir: str | Path | None = None,
) -> Eigenpairs:
    """Top-`k` eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation (float64).

    `which`: LA largest algebraic, SA smallest algebraic, LM largest magnitude, BE k from both ends.
    Stops when every wanted Ritz pair has residual <= `tol` * |largest Ritz value|; the residual is the
    Lanczos identity ||A y - theta y|| = |beta_m s_m| (exact up to rounding under full reorthogonalisation).
    The Krylov basis takes iterations x dim x 8 bytes of RAM; `basis_dtype=torch.float32` halves that
    (the three-term recurrence and every product stay float64, so eigenvalues keep ~1e-7 relative
    accuracy), and `basis_dir` keeps it in a file there instead of in the process (see `KrylovBasis`).
    """
    if which not in ("LA", "SA", "LM", "BE"):
        raise ValueError(f"which must be LA, SA, LM or BE, not {which!r}")
    max_iter = min(max_iter, dim)
    min_iter = min(
        max_iter, min_iter if min_iter is not None else min(dim, 2 * k + 2 if which != "BE" else 3 * k)
    )
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=torch.float64) if v0 is None else v0.double().cpu().clone()
    q = q / q.norm()
    basis = KrylovBasis(dim, max_iter, basis_dtype, basis_dir)
    prev = torch.zeros_like(q)
    alphas: list[float] = []
    betas: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=max_iter, disable=not progress, desc=f"lanczos {which} k={k}")
    theta = s = None
    converged = False
    try:
        for j in range(max_iter):
            basis.append(q)
            w = matvec(q).double().cpu()
            a = float(w @ q)
            alphas.append(a)
            w -= a * q
            if j > 0:
                w -= betas[-1] * prev
            w = basis.orthogonalise(w)
            b = float(w.norm())
            betas.append(b)
            bar.update(1)
            invariant = b < 1e-12 * max(1.0, max(abs(x) for x in alphas))
            m = j + 1
            if invariant or m == max_iter or (m >= min_iter and (m - min_iter) % check_every == 0):
                theta, s = _tridiag_eig(alphas, betas[:-1])
                idx = _select(theta, k, which)
                res = np.abs(b * s[-1, idx])
                scale = max(np.abs(theta).max(), 1e-300)
                bar.set_postfix(max_res=f"{res.max() / scale:.1e}")
                if invariant or (len(idx) >= min(k, dim) and res.max() <= tol * scale):
                    converged = True
                    break
            prev, q = q, w / b
        bar.close()
        m = len(alphas)
        idx = _select(theta, k, which)
        if not converged:
            warnings.warn(
                f"lanczos: {m} iterations did not bring every wanted residual below tol={tol:g} x |lambda_max| "
                f"(worst {np.abs(betas[-1] * s[-1, idx]).max() / max(np.abs(theta).max(), 1e-300):.1e}); "
                "check Eigenpairs.residuals or raise max_iter (clustered eigenvalues near 0 converge slowly)",
                stacklevel=2,
            )
        ritz = basis.combine(torch.from_numpy(np.ascontiguousarray(s[:, idx].T)))
    finally:
        basis.close()
    residuals = np.abs(betas[-1] * s[-1, idx])
    n_products = m
    meta = {
        "iterations": m,
        "converged": converged,
        "tol": tol,
        "seconds": time.perf_counter() - t0,
        "dim": dim,
        "seed": seed,
        "basis": f"{str(basis_dtype).removeprefix('torch.')} {'file' if basis_dir is not None else 'RAM'}",
    }
    return Eigenpairs(
        torch.from_numpy(theta[idx].copy()), ritz, torch.from_numpy(residuals), n_products, which, meta
    )


def _tridiag_eig(alphas: list[float], offdiag: list[float]) -> tuple[np.ndarray, np.ndarray]:
    from scipy.linalg import eigh_tridiagonal

    if len(alphas) == 1:
        return np.array(alphas), np.ones((1, 1))
    return eigh_tridiagonal(np.array(alphas), np.array(offdiag))


def lanczos_tridiagonal(
    matvec: MatVec, v0: torch.Tensor, steps: int, reorthogonalise: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """`steps` Lanczos steps from `v0`: returns (alphas, betas) of the tridiagonal T (len steps, steps-1).

    Stops early at an invariant subspace. Used by stochastic Lanczos quadrature.
    """
    dim = v0.numel()
    steps = min(steps, dim)
    q = v0.double().cpu() / v0.norm()
    basis = KrylovBasis(dim, steps) if reorthogonalise else None
    prev = torch.zeros_like(q)
    alphas, betas = [], []
    b = 0.0
    for j in range(steps):
        if basis is not None:
            basis.append(q)
        w = matvec(q).double().cpu()
        a = float(w @ q)
        alphas.append(a)
        w = w - a * q - b * prev
        if basis is not None:
            w = basis.orthogonalise(w)
        b = float(w.norm())
        if j == steps - 1 or b < 1e-12 * max(1.0, max(abs(x) for x in alphas)):
            break
        betas.append(b)
        prev, q = q, w / b
    return np.array(alphas), np.array(betas)
