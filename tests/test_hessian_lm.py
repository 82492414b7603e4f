"""The language model's MLP curvature: GGN products against the explicit J^T H J of a micro Llama, token
streams, and Lanczos / SLQ checkpoints that resume (after an exception or a SIGKILL) to the identical result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from conftest import char_tokenizer, micro_llama
from steerlab.data.errors import DataFormatError
from steerlab.hessian import Eigenpairs, lanczos, slq_density
from steerlab.hessian.density import tridiagonal_density
from steerlab.hessian.lanczos import CheckpointMismatchError
from steerlab.hessian.lm import layer_params, text_operator, token_chunks

HERE = Path(__file__).resolve()
SRC = HERE.parents[1] / "src"
KILL_ENV = "STEERLAB_HESSIAN_TEST_KILL_AFTER"


def lm_case(n_seqs: int = 4, length: int = 6, batch_size: int = 2, shard: bool = False):
    """A float64 micro Llama, its MLP weights (all layers), `n_seqs` random token sequences and their GGN."""
    model = micro_llama(seed=1, hidden=8, intermediate=16)
    gen = torch.Generator().manual_seed(3)
    seqs = list(torch.randint(1, 64, (n_seqs, length), generator=gen))
    params = layer_params(model, None, "mlp")
    op = text_operator(model, None, seqs, params, kind="ggn", batch_size=batch_size, shard=shard)
    return model, seqs, params, op


def test_ggn_of_mlp_weights_equals_forward_mode_jacobian_products():
    """G v = J^T H J v with J v by forward-mode AD, H the softmax cross-entropy Hessian written out
    (diag(p) - p p^T per predicted position, over the number of predictions) and J^T by a vjp."""
    model, seqs, params, op = lm_case()
    assert op.dim == 2 * 3 * 8 * 16 and len(op.batches) == 2
    names = list(params)
    base = {n: p.detach() for n, p in params.items()}
    sizes = [p.numel() for p in base.values()]
    flat = torch.cat([p.reshape(-1) for p in base.values()])
    ids = torch.stack(seqs)

    def logits(theta):
        chunks = torch.split(theta, sizes)
        new = {n: c.view(base[n].shape) for n, c in zip(names, chunks)}
        return functional_call(model, new, (ids,)).logits

    vs = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, vjp = torch.func.vjp(logits, flat)
    p = torch.softmax(out[:, :-1].detach(), -1)
    got = op.matmat(vs)
    for j in range(vs.shape[1]):
        _, jv = torch.func.jvp(logits, (flat,), (vs[:, j],))
        u = jv[:, :-1]
        hu = (p * u - p * (p * u).sum(-1, keepdim=True)) / u[..., 0].numel()
        (want,) = vjp(torch.cat([hu, torch.zeros_like(jv[:, -1:])], 1))
        # Llama's RMSNorm computes in float32 even in a float64 model: the two routes agree to ~1e-7
        assert (got[:, j] - want).abs().max() <= 1e-6 * want.abs().max()
        assert float(vs[:, j] @ got[:, j]) > 0  # the GGN is positive semi-definite


def test_token_chunks_cut_one_stream(tmp_path):
    tok = char_tokenizer()
    path = tmp_path / "wiki.txt"
    path.write_text("abcdefghij" * 5)
    chunks = token_chunks(tok, path, 3, 7)
    stream = tok("abcdefghij" * 5, add_special_tokens=False)["input_ids"]
    assert [c.tolist() for c in chunks] == [stream[0:7], stream[7:14], stream[14:21]]
    with pytest.raises(DataFormatError, match="wiki.txt.*fewer than the 10 x 7"):
        token_chunks(tok, path, 10, 7)


class Interrupt(Exception):
    pass


def interrupting(matvec, after: int):
    """`matvec` that raises after `after` calls (a crash mid-run)."""
    calls = [0]

    def f(v):
        calls[0] += 1
        if calls[0] > after:
            raise Interrupt
        return matvec(v)

    return f


def run_lanczos(op, checkpoint=None, matvec=None, **kw):
    return lanczos(
        matvec or op.matvec,
        op.dim,
        k=3,
        tol=1e-10,
        max_iter=20,
        progress=False,
        checkpoint=checkpoint,
        checkpoint_every=3,
        **{"seed": 5, **kw},
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lanczos_resumes_after_an_exception_to_the_identical_result(tmp_path, dtype):
    *_, op = lm_case()
    want = run_lanczos(op, basis_dtype=dtype)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        run_lanczos(op, ckpt, interrupting(op.matvec, 8), basis_dtype=dtype)
    assert (ckpt / "state.safetensors").exists()
    with pytest.raises(Interrupt):  # resumed from step 6, interrupted again
        run_lanczos(op, ckpt, interrupting(op.matvec, 4), basis_dtype=dtype)
    got = run_lanczos(op, ckpt, basis_dtype=dtype)
    assert got.meta["iterations"] == want.meta["iterations"]
    assert torch.equal(got.values, want.values) and torch.equal(got.vectors, want.vectors)
    again = run_lanczos(op, ckpt, interrupting(op.matvec, 0), basis_dtype=dtype)  # finished: no product
    assert torch.equal(again.vectors, want.vectors)
    with pytest.raises(CheckpointMismatchError, match="seed: saved 5 != requested 6"):
        run_lanczos(op, ckpt, basis_dtype=dtype, seed=6)


def test_density_resumes_after_an_exception_to_the_identical_result(tmp_path):
    *_, op = lm_case()

    def density(matvec, ckpt=None):
        return slq_density(
            matvec, op.dim, n_probes=3, steps=7, seed=2, progress=False, checkpoint=ckpt, checkpoint_every=2
        )

    want = density(op.matvec)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        density(interrupting(op.matvec, 11), ckpt)  # probe 0 done, probe 1 at step 4
    assert not (ckpt / "probe-0" / "basis.bin").exists()  # a finished probe keeps only its coefficients
    got = density(op.matvec, ckpt)
    for a, b in zip(got.nodes + got.weights, want.nodes + want.weights):
        assert np.array_equal(a, b)
    assert got.n_products == want.n_products == 21


def test_a_lanczos_run_is_one_slq_probe():
    *_, op = lm_case()
    eig = lanczos(op.matvec, op.dim, k=2, min_iter=6, max_iter=6, tol=0.0, seed=4, progress=False)
    one = tridiagonal_density(eig.meta["alphas"], eig.meta["betas"])
    slq = slq_density(op.matvec, op.dim, n_probes=1, steps=6, seed=4, progress=False)
    assert np.allclose(one.nodes[0], slq.nodes[0], rtol=1e-12) and np.allclose(one.weights[0], slq.weights[0])
    assert one.nodes[0].max() == pytest.approx(float(eig.values[0]), rel=1e-12)
    assert one.weights[0].sum() == pytest.approx(1.0, rel=1e-12)


def _worker() -> None:
    """`python test_hessian_lm.py OUT CKPT`: the checkpointed run, killed by SIGKILL after N products."""
    out, ckpt = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    *_, op = lm_case()
    matvec = op.matvec
    after = int(os.environ.get(KILL_ENV, "0"))
    if after:
        calls = [0]

        def matvec(v):  # noqa: F811 (the killing variant)
            calls[0] += 1
            if calls[0] > after:
                os.kill(os.getpid(), signal.SIGKILL)
            return op.matvec(v)

    run_lanczos(op, ckpt, matvec, basis_dtype=torch.float32).save(out)


def test_lanczos_resumes_after_sigkill(tmp_path):
    *_, op = lm_case()
    want = run_lanczos(op, basis_dtype=torch.float32)
    env = dict(
        os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )
    cmd = [sys.executable, str(HERE), str(tmp_path / "out"), str(tmp_path / "ckpt")]
    killed = subprocess.run(cmd, env={**env, KILL_ENV: "7"}, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "ckpt" / "state.safetensors").exists() and not (tmp_path / "out").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = Eigenpairs.load(tmp_path / "out")
    assert torch.equal(got.values, want.values) and torch.equal(got.vectors, want.vectors)


if __name__ == "__main__":
    _worker()
