"""Curvature products sharded over torchrun processes (gloo, CPU): two processes give what one gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from steerlab.hessian import lanczos, slq_density
from steerlab.io import load_tensors, save_tensors
from test_hessian_lm import lm_case

HERE = Path(__file__).resolve()
SRC = HERE.parents[1] / "src"


def compute(op) -> dict[str, torch.Tensor]:
    """One GGN product, the gradient, the loss, top-4 eigenpairs and an SLQ density, all float64."""
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    eig = lanczos(op.matvec, op.dim, k=4, tol=1e-10, max_iter=40, seed=1, progress=False)
    dens = slq_density(op.matvec, op.dim, n_probes=2, steps=6, seed=3, progress=False)
    return {
        "product": op.matvec(v),
        "gradient": op.gradient(),
        "loss": torch.tensor([op.loss()], dtype=torch.float64),
        "values": eig.values,
        "vectors": eig.vectors,
        "nodes": torch.from_numpy(dens.nodes[1]),
        "local": torch.tensor(op.local),
    }


def _worker() -> None:
    from steerlab import distributed

    torch.set_num_threads(1)
    assert distributed.init("gloo")
    *_, op = lm_case(n_seqs=6, batch_size=1, shard=True)
    out = compute(op)
    save_tensors(Path(sys.argv[1]) / f"rank{distributed.rank()}.safetensors", out)
    torch.distributed.destroy_process_group()


def _env():
    return dict(
        os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )


def _run(cmd, timeout=600):
    """Run in its own process group; on timeout kill the group (torchrun's children too)."""
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29547",
        *args,
    ]


def test_two_gloo_processes_equal_one(tmp_path):
    *_, op = lm_case(n_seqs=6, batch_size=1)
    want = compute(op)
    proc = _run(torchrun(str(HERE), str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_tensors(tmp_path / f"rank{r}.safetensors")[0] for r in (0, 1)]
    assert ranks[0]["local"].tolist() == [0, 2, 4] and ranks[1]["local"].tolist() == [1, 3, 5]
    for got in ranks:
        for key in ("product", "gradient", "loss", "values", "nodes"):
            assert torch.allclose(got[key], want[key], rtol=1e-10, atol=1e-14), key
        # Ritz vectors up to sign
        signs = torch.sign((got["vectors"] * want["vectors"]).sum(1, keepdim=True))
        assert torch.allclose(got["vectors"] * signs, want["vectors"], atol=1e-8)
    for key in ("product", "values", "vectors"):  # every process holds the same numbers
        assert torch.equal(ranks[0][key], ranks[1][key]), key


def test_cli_spectrum_under_torchrun_matches_one_process(tmp_path):
    from conftest import char_tokenizer, tiny_model

    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    text = tmp_path / "stream.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    args = [
        "-q", "hessian", "spectrum", "--model", str(folder), "--dtype", "float64", "--text", str(text), "--stream",
        "--n-texts", "4", "--max-length", "12", "--batch-size", "1", "--layers", "0", "--kind", "ggn",
        "--k", "3", "--tol", "1e-10", "--threads", "1",
    ]  # fmt: skip
    one = _run([sys.executable, "-m", "steerlab.cli", *args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(
        torchrun("-m", "steerlab.cli", *args, "--out", str(tmp_path / "two"), "--checkpoint-every", "2")
    )
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    a, b = (
        json.loads(p.read_text())
        for p in (tmp_path / "one" / "spectrum.json", tmp_path / "two" / "spectrum.json")
    )
    assert a["operator"]["processes"] == 1 and b["operator"]["processes"] == 2
    assert a["tokens"] == b["tokens"] == 48
    assert max(abs(x - y) for x, y in zip(a["values"], b["values"])) <= 1e-10 * abs(a["values"][0])
    assert not (tmp_path / "two" / "checkpoint" / "spectrum").exists()  # removed once the result is written


if __name__ == "__main__":
    _worker()
