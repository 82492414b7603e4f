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

from steerlab.errors import UserError
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
    vectors); the file is removed by `close`. With `file`, rows go to that named file instead, which
    `close` keeps: its first `rows` rows are taken as already stored (anything after them is cut off).
    """

    def __init__(
        self,
        dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float64,
        folder: str | Path | None = None,
        chunk_bytes: int = 2**24,
        file: str | Path | None = None,
        rows: int = 0,
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
        if file is not None:
            file = Path(file)
            file.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(file, "r+b" if file.exists() else "w+b")  # noqa: SIM115 (closed by close)
            size = rows * dim * self._itemsize
            if self._file.seek(0, 2) < size:
                raise OSError(f"{file}: holds fewer than the {rows} basis rows its checkpoint records")
            self._file.truncate(size)
            self.rows = rows
        elif folder is None:
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

    def append_from_file(self, path: str | Path, rows: int) -> None:
        """Append the first `rows` rows of another basis file of the same dimension and dtype."""
        with open(path, "rb") as f:
            for _ in range(rows):
                raw = f.read(self.dim * self._itemsize)
                if len(raw) != self.dim * self._itemsize:
                    raise OSError(f"short read from the basis file {path}")
                self.append(torch.from_numpy(np.frombuffer(raw, dtype=self._np_dtype).copy()))

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


class CheckpointMismatchError(UserError):
    """A Lanczos checkpoint folder holds a run of another operator, seed or basis storage."""


class LanczosState:
    """A Lanczos recurrence with full reorthogonalisation (float64), optionally checkpointed to a folder.

    `step(matvec)` applies the operator to the current vector q_j and appends alpha_j and beta_{j+1};
    `advance(w)` moves to q_{j+1} = w / beta_{j+1}. With `checkpoint`, the basis is appended to
    `basis.bin` there and every `every` steps `state.safetensors` (alphas, betas, q, prev, and the run's
    `fingerprint` in its header) is replaced atomically; a new `LanczosState` on the same folder resumes
    from it (the basis file is cut back to the saved step), so an interrupted run ends bitwise as an
    uninterrupted one. Under torchrun every process runs the same recurrence; only rank 0 writes the
    checkpoint, and the others read the basis back from its file when they resume.
    """

    def __init__(
        self,
        start: torch.Tensor,
        capacity: int,
        basis_dtype: torch.dtype = torch.float64,
        basis_dir: str | Path | None = None,
        checkpoint: str | Path | None = None,
        every: int = 5,
        fingerprint: dict | None = None,
        reorthogonalise: bool = True,
    ) -> None:
        from steerlab import distributed

        self.dim = start.numel()
        self.every = max(1, every)
        self.writer = checkpoint is not None and distributed.is_main()
        self.folder = Path(checkpoint) if checkpoint is not None else None
        self.fingerprint = {
            "dim": self.dim,
            "basis_dtype": str(basis_dtype).removeprefix("torch."),
            "reorthogonalise": reorthogonalise,
            **(fingerprint or {}),
        }
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.q = start.double().cpu() / start.norm()
        self.prev = torch.zeros_like(self.q)
        self.finished = False
        saved = None
        if self.folder is not None and (self.folder / "state.safetensors").exists():
            saved = self._read_state()
        capacity = max(capacity, len(self.alphas))
        if not reorthogonalise or (saved and self.finished and not (self.folder / "basis.bin").exists()):
            self.basis = None
        elif self.writer:
            self.basis = KrylovBasis(
                self.dim, capacity, basis_dtype, file=self.folder / "basis.bin", rows=len(self.alphas)
            )
        else:
            self.basis = KrylovBasis(self.dim, capacity, basis_dtype, basis_dir)
            if saved:
                self.basis.append_from_file(self.folder / "basis.bin", len(self.alphas))

    def _read_state(self) -> bool:
        from steerlab.io import load_tensors

        path = self.folder / "state.safetensors"
        tensors, header = load_tensors(path)
        saved = header.get("fingerprint", {})
        for key, value in self.fingerprint.items():
            if saved.get(key) != value:
                raise CheckpointMismatchError(
                    f"{path}: checkpoint of another run ({key}: saved {saved.get(key)!r} != requested "
                    f"{value!r}); remove the folder to start afresh"
                )
        self.alphas = tensors["alphas"].tolist()
        self.betas = tensors["betas"].tolist()
        # fresh (aligned) copies: BLAS may sum in another order on a buffer at another alignment
        self.q, self.prev = tensors["q"].clone(), tensors["prev"].clone()
        self.finished = bool(tensors["finished"].item())
        return True

    def save(self) -> None:
        """Replace the checkpoint's state with the current one (rank 0 only; basis rows are already on disk)."""
        if not self.writer:
            return
        from steerlab.io import save_tensors

        tensors = {
            "alphas": torch.tensor(self.alphas, dtype=torch.float64),
            "betas": torch.tensor(self.betas, dtype=torch.float64),
            "q": self.q,
            "prev": self.prev,
            "finished": torch.tensor([int(self.finished)]),
        }
        save_tensors(self.folder / "state.safetensors", tensors, {"fingerprint": self.fingerprint})

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def step(self, matvec: MatVec) -> torch.Tensor:
        """w = A q_j - alpha_j q_j - beta_j q_{j-1}, reorthogonalised; appends alpha_j and beta_{j+1} = |w|."""
        if self.basis is not None:
            self.basis.append(self.q)
        w = matvec(self.q).double().cpu()
        a = float(w @ self.q)
        self.alphas.append(a)
        w = w - a * self.q - (self.betas[-1] if self.betas else 0.0) * self.prev
        if self.basis is not None:
            w = self.basis.orthogonalise(w)
        self.betas.append(float(w.norm()))
        return w

    def advance(self, w: torch.Tensor) -> None:
        """Move to q_{j+1} = w / beta_{j+1}; checkpoint every `every` steps."""
        self.prev, self.q = self.q, w / self.betas[-1]
        if self.steps % self.every == 0:
            self.save()

    def finish(self) -> None:
        """Mark the recurrence done (and checkpoint it, so a rerun goes straight to the result)."""
        self.finished = True
        self.save()

    def invariant(self) -> bool:
        return self.betas[-1] < 1e-12 * max(1.0, max(abs(x) for x in self.alphas))

    def close(self, discard_basis: bool = False) -> None:
        """Close the basis; `discard_basis`: also delete the checkpoint's basis file (once finished)."""
        if self.basis is not None:
            self.basis.close()
        if discard_basis and self.writer and self.finished:
            (self.folder / "basis.bin").unlink(missing_ok=True)


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
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 5,
) -> Eigenpairs:
    """Top-`k` eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation (float64).

    `which`: LA largest algebraic, SA smallest algebraic, LM largest magnitude, BE k from both ends.
    Stops when every wanted Ritz pair has residual <= `tol` * |largest Ritz value|; the residual is the
    Lanczos identity ||A y - theta y|| = |beta_m s_m| (exact up to rounding under full reorthogonalisation).
    The Krylov basis takes iterations x dim x 8 bytes of RAM; `basis_dtype=torch.float32` halves that
    (the three-term recurrence and every product stay float64, so eigenvalues keep ~1e-7 relative
    accuracy), and `basis_dir` keeps it in a file there instead of in the process (see `KrylovBasis`).
    `checkpoint`: a folder where the run is saved every `checkpoint_every` iterations (the basis in a file
    there) and from which a rerun with the same arguments resumes (see `LanczosState`).
    """
    if which not in ("LA", "SA", "LM", "BE"):
        raise ValueError(f"which must be LA, SA, LM or BE, not {which!r}")
    max_iter = min(max_iter, dim)
    min_iter = min(
        max_iter, min_iter if min_iter is not None else min(dim, 2 * k + 2 if which != "BE" else 3 * k)
    )
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=torch.float64) if v0 is None else v0.double().cpu().clone()
    run = LanczosState(
        q,
        max_iter,
        basis_dtype,
        basis_dir,
        checkpoint,
        checkpoint_every,
        fingerprint={"seed": seed, "v0": v0 is not None, "k": k, "which": which, "tol": tol},
    )
    t0 = time.perf_counter()
    bar = tqdm(total=max_iter, initial=run.steps, disable=not progress, desc=f"lanczos {which} k={k}")
    converged = False
    if run.steps >= max_iter and not run.finished:  # resumed with a smaller max_iter
        run.finish()
    try:
        while not run.finished:
            w = run.step(matvec)
            bar.update(1)
            invariant = run.invariant()
            m = run.steps
            if invariant or m >= max_iter or (m >= min_iter and (m - min_iter) % check_every == 0):
                theta, s = _tridiag_eig(run.alphas, run.betas[:-1])
                idx = _select(theta, k, which)
                res = np.abs(run.betas[-1] * s[-1, idx])
                scale = max(np.abs(theta).max(), 1e-300)
                bar.set_postfix(max_res=f"{res.max() / scale:.1e}")
                if invariant or (len(idx) >= min(k, dim) and res.max() <= tol * scale) or m >= max_iter:
                    run.finish()
                    break
            run.advance(w)
        bar.close()
        m = run.steps
        theta, s = _tridiag_eig(run.alphas, run.betas[:-1])
        idx = _select(theta, k, which)
        residuals = np.abs(run.betas[-1] * s[-1, idx])
        scale = max(np.abs(theta).max(), 1e-300)
        converged = bool(run.invariant() or (len(idx) >= min(k, dim) and residuals.max() <= tol * scale))
        if not converged:
            warnings.warn(
                f"lanczos: {m} iterations did not bring every wanted residual below tol={tol:g} x |lambda_max| "
                f"(worst {residuals.max() / max(np.abs(theta).max(), 1e-300):.1e}); "
                "check Eigenpairs.residuals or raise max_iter (clustered eigenvalues near 0 converge slowly)",
                stacklevel=2,
            )
        ritz = run.basis.combine(torch.from_numpy(np.ascontiguousarray(s[:, idx].T)))
    finally:
        run.close()
    meta = {
        "iterations": m,
        "converged": converged,
        "tol": tol,
        "seconds": time.perf_counter() - t0,
        "dim": dim,
        "seed": seed,
        "alphas": list(run.alphas),  # the tridiagonal T: with v0=None, one stochastic Lanczos quadrature
        "betas": list(run.betas[:-1]),  # probe (see `density.tridiagonal_density`)
        "basis": f"{str(basis_dtype).removeprefix('torch.')} "
        f"{'file' if basis_dir is not None or checkpoint is not None else 'RAM'}",
    }
    return Eigenpairs(torch.from_numpy(theta[idx].copy()), ritz, torch.from_numpy(residuals), m, which, meta)


def _tridiag_eig(alphas: list[float], offdiag: list[float]) -> tuple[np.ndarray, np.ndarray]:
    from scipy.linalg import eigh_tridiagonal

    if len(alphas) == 1:
        return np.array(alphas), np.ones((1, 1))
    return eigh_tridiagonal(np.array(alphas), np.array(offdiag))


def lanczos_tridiagonal(
    matvec: MatVec,
    v0: torch.Tensor,
    steps: int,
    reorthogonalise: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 5,
    progress: bool = False,
    basis_dtype: torch.dtype = torch.float64,
    basis_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`steps` Lanczos steps from `v0`: returns (alphas, betas) of the tridiagonal T (len steps, steps-1).

    Stops early at an invariant subspace. Used by stochastic Lanczos quadrature. `checkpoint`: save and
    resume as in `LanczosState` (a rerun after an interruption gives the identical result; a finished
    run keeps only its coefficients). `basis_dtype` / `basis_dir` as in `lanczos`.
    """
    steps = min(steps, v0.numel())
    run = LanczosState(
        v0,
        steps,
        basis_dtype,
        basis_dir,
        checkpoint=checkpoint,
        every=checkpoint_every,
        fingerprint={"steps": steps},
        reorthogonalise=reorthogonalise,
    )
    bar = tqdm(total=steps, initial=run.steps, disable=not progress, desc="lanczos steps", leave=False)
    try:
        while not run.finished:
            w = run.step(matvec)
            bar.update(1)
            if run.steps == steps or run.invariant():
                run.finish()
                break
            run.advance(w)
    finally:
        bar.close()
        run.close(discard_basis=True)
    return np.array(run.alphas), np.array(run.betas[:-1])
