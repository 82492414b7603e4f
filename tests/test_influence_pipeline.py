"""Streaming pipeline: equals the in-memory scores, refuses changed arguments, resumes after SIGKILL to
bitwise-identical results, shards over 2 gloo processes, TF-IDF prefilter recall, bf16 capture error.

Run as a script, this file is the worker of the subprocess tests (`resume` and `dist` modes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steerlab.influence import (
    fit_factors,
    pairwise_scores,
    preconditioned_queries,
    query_gradients,
    self_scores,
)
from steerlab.influence.stages import KILL_ENV, StageArgumentsError
from steerlab.influence.topk import tfidf_candidates, topk_recall
from steerlab.io import load_result, load_tensors

HERE = Path(__file__).resolve()
SRC = HERE.parents[1] / "src"


def mlp_setup():
    """A small MLP classification problem (no transformers import: fast subprocesses)."""
    from torch import nn

    from steerlab.influence import ClassificationTask
    from steerlab.influence.pipeline import TensorBatches

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(37, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (37,), generator=g)
    queries = [(torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))]
    return model, ClassificationTask(), TensorBatches(x, y, 4), queries


def lm_setup(dtype=torch.float64):
    from conftest import micro_llama
    from steerlab.influence import LanguageModelTask
    from steerlab.influence.data import query_batch
    from steerlab.influence.pipeline import BlockBatches

    model = micro_llama(dtype)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, 64, (24, 16), generator=g)
    copied = [3, 17]
    queries = [
        query_batch([blocks[i, :8].tolist() for i in copied], [blocks[i, 8:].tolist() for i in copied])
    ]
    return model, LanguageModelTask(), BlockBatches(blocks, 4), queries, copied


def run_pipeline(run_dir, setup, **kw):
    from steerlab.influence.pipeline import fit, score, self_influence

    model, task, train, queries = setup[:4]
    factors = fit(run_dir, model, task, train, seed=7, checkpoint_every=1, **kw)
    result = score(run_dir, model, task, train, queries, top_k=5, checkpoint_every=1)
    self_influence(run_dir, model, task, train, checkpoint_every=1)  # stored in run_dir/self
    return factors, result


def _worker() -> None:
    mode, run_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == "resume":
        run_pipeline(run_dir, mlp_setup())
    elif mode == "dist":
        from steerlab import distributed

        assert distributed.init("gloo")
        run_pipeline(run_dir, lm_setup())
        torch.distributed.destroy_process_group()


def _run(cmd, env, timeout):
    """Run a command in its own process group; on timeout kill the whole group (torchrun's children too)."""
    import signal

    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _env():
    env = dict(
        os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )
    env.pop("STEERLAB_INFLUENCE_TEST_KILL", None)
    return env


def test_pipeline_equals_in_memory_scores(tmp_path):
    model, task, train, queries = mlp_setup()
    factors, result = run_pipeline(tmp_path, (model, task, train, queries))
    mem = fit_factors(model, task, list(train), seed=None)  # different labels: compare structure only
    assert set(mem.tensors) == set(factors.tensors)
    pre = preconditioned_queries(query_gradients(model, task, queries), factors, "ekfac")
    full = pairwise_scores(model, task, list(train), pre)["scores"].double()
    top = full.topk(5, dim=1)
    assert torch.equal(result["top_index"], top.indices)
    assert torch.allclose(result["top_values"], top.values, rtol=1e-5)
    bottom = (-full).topk(5, dim=1)
    assert torch.equal(result["bottom_index"], bottom.indices)
    assert torch.allclose(result["sample_values"], full, rtol=1e-5)
    stored = load_tensors(tmp_path / "self" / "result.safetensors")[0]
    assert torch.equal(stored["index"], torch.arange(len(train.x)))
    in_memory = self_scores(model, task, list(train), factors)
    assert torch.allclose(stored["values"], in_memory, rtol=1e-12)


def test_changed_arguments_are_refused_and_done_stages_skipped(tmp_path):
    model, task, train, queries = mlp_setup()
    from steerlab.influence.pipeline import fit

    fit(tmp_path, model, task, train, seed=7)
    mtime = (tmp_path / "covariance" / "result.safetensors").stat().st_mtime_ns
    fit(tmp_path, model, task, train, seed=7)  # done: skipped
    assert (tmp_path / "covariance" / "result.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(StageArgumentsError, match="seed: saved 7 != requested 8"):
        fit(tmp_path, model, task, train, seed=8)


def test_sigkill_in_every_stage_resumes_bitwise(tmp_path):
    ref = tmp_path / "ref"
    ref_factors, ref_scores = run_pipeline(ref, mlp_setup())
    run = tmp_path / "killed"
    cmd = [sys.executable, str(HERE), "resume", str(run)]
    for stage in ("covariance", "lambda", "scores", "self"):
        proc = _run(cmd, {**_env(), KILL_ENV: f"{stage}:3"}, 60)
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert (run / stage / "ckpt-r0-w1.safetensors").exists()
        assert not (run / stage / "result.safetensors").exists()
    proc = _run(cmd, _env(), 60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in (
        "lambda/factors.safetensors",
        "scores/result.safetensors",
        "covariance/result.safetensors",
        "self/result.safetensors",
    ):
        got, want = load_tensors(run / path)[0], load_tensors(ref / path)[0]
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (path, k)


def test_two_gloo_processes_equal_one(tmp_path):
    single = tmp_path / "single"
    factors, result = run_pipeline(single, lm_setup())
    multi = tmp_path / "multi"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        str(HERE),
        "dist",
        str(multi),
    ]
    proc = _run(cmd, _env(), 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_tensors(multi / "lambda" / "factors.safetensors")[0]
    for k, v in factors.tensors.items():
        if "/Q" in k:  # eigenvectors: compare up to sign through the projector of each vector
            v, g = v * v[0:1].sign(), got[k] * got[k][0:1].sign()
            assert torch.allclose(g, v, atol=1e-8), k
        else:
            assert torch.allclose(got[k], v, rtol=1e-10, atol=1e-14), k
    scores = load_tensors(multi / "scores" / "result.safetensors")[0]
    assert torch.equal(scores["top_index"], result["top_index"])
    assert torch.allclose(scores["top_values"], result["top_values"], rtol=1e-8)
    assert torch.allclose(scores["sample_values"], result["sample_values"], rtol=1e-8, atol=1e-12)
    assert (multi / "covariance" / "ckpt-r1-w2.safetensors").exists()
    one, two = (load_tensors(r / "self" / "result.safetensors")[0] for r in (single, multi))
    assert torch.equal(one["index"], two["index"])
    assert torch.allclose(one["values"], two["values"], rtol=1e-10)


def test_copied_queries_rank_first_and_tfidf_prefilter_recall(tmp_path):
    model, task, train, queries, copied = lm_setup()
    _, full = run_pipeline(tmp_path / "full", (model, task, train, queries))
    assert full["top_index"][:, 0].tolist() == copied
    q_tokens = [row.tolist() for row in queries[0]["input_ids"]]
    cands = tfidf_candidates(q_tokens, [b.tolist() for b in train.blocks], keep=12)
    recall = topk_recall(cands, full["top_index"][:, :5])
    print("tfidf recall of unfiltered top-5 keeping 12/24:", recall)
    from steerlab.influence.pipeline import score

    filtered = score(
        tmp_path / "full", model, task, train, queries, top_k=5, candidates=cands, name="filtered"
    )
    for q in range(len(cands)):
        assert set(filtered["top_index"][q].tolist()) <= set(cands[q].tolist())
    assert filtered["top_index"][:, 0].tolist() == copied
    assert recall >= 0.5


def test_prefix_cache_pipeline_matches_plain_run(tmp_path):
    from steerlab.influence.pipeline import fit, score

    model, task, train, queries, copied = lm_setup()
    task = type(task)(layers=[1])
    plain = fit(tmp_path / "plain", model, task, train, seed=3)
    fast = fit(tmp_path / "fast", model, task, train, seed=3, prefix_cache=True)
    assert len(list((tmp_path / "fast" / "prefix").glob("batch-*.safetensors"))) == len(train)
    for k, v in plain.tensors.items():
        assert torch.allclose(fast.tensors[k].abs(), v.abs(), rtol=1e-9, atol=1e-12), k
    a = score(tmp_path / "plain", model, task, train, queries, top_k=5)
    b = score(tmp_path / "fast", model, task, train, queries, top_k=5)
    assert torch.equal(a["top_index"], b["top_index"])
    assert torch.allclose(a["sample_values"], b["sample_values"], rtol=1e-9)
    # candidates: subset batches gather their rows from the cached batches
    cands = torch.tensor([[0, 5, 9, 17, 22], [3, 4, 11, 17, 20]])
    a = score(tmp_path / "plain", model, task, train, queries, top_k=3, candidates=cands, name="c")
    b = score(tmp_path / "fast", model, task, train, queries, top_k=3, candidates=cands, name="c")
    assert torch.equal(a["top_index"], b["top_index"])
    assert torch.allclose(a["top_values"], b["top_values"], rtol=1e-9)
    from steerlab.influence.pass_cache import DiskCache, cached_rows

    sub = train.with_subset([5, 9, 22])
    gathered = cached_rows(sub[0], DiskCache.of_run(tmp_path / "fast"), sub.indices(0), train.batch_size)
    assert gathered["prefix_hidden"].shape[0] == 3 and gathered["head_grad"].shape[0] == 3


def test_pipeline_with_several_label_draws_equals_in_memory_fit(tmp_path):
    from steerlab.influence.pipeline import fit

    model, task, train, _, _ = lm_setup()
    streamed = fit(tmp_path, model, task, train, seed=3, samples=3, prefix_cache=True)
    in_memory = fit_factors(model, task, list(train), seed=3, samples=3)
    for k, v in in_memory.tensors.items():
        assert torch.allclose(streamed.tensors[k].abs(), v.abs(), rtol=1e-9, atol=1e-12), k


def test_bfloat16_capture_error_is_small(tmp_path):
    from scipy.stats import spearmanr

    model, task, train, queries, _ = lm_setup(torch.float32)
    out = {}
    for dtype in (None, torch.bfloat16):
        factors = fit_factors(model, task, list(train), seed=0, dtype=dtype)
        pre = preconditioned_queries(query_gradients(model, task, queries, dtype=dtype), factors, "ekfac")
        out[dtype] = pairwise_scores(model, task, list(train), pre, dtype=dtype)["scores"].double()
    err = float((out[torch.bfloat16] - out[None]).norm() / out[None].norm())
    rho = min(spearmanr(a, b).statistic for a, b in zip(out[None], out[torch.bfloat16]))
    print(f"bf16 capture: relative score error {err:.4f}, min Spearman {rho:.4f}")
    assert err < 0.05 and rho > 0.95


def test_results_are_result_files_with_a_header(tmp_path):
    """Factors, scores and self-influence are `save_result` files: tensors + JSON with format and model."""
    import json

    from steerlab.influence.pipeline import fit, score, self_influence

    model, task, train, queries = mlp_setup()
    info = {"name": "mlp"}
    fit(tmp_path, model, task, train, seed=7, model_info=info)
    result = score(tmp_path, model, task, train, queries, top_k=3, model_info=info)
    selfs = self_influence(tmp_path, model, task, train, model_info=info)
    for path, kind in (
        ("lambda/factors", "InfluenceFactors"),
        ("scores/result", "InfluenceScores"),
        ("self/result", "SelfInfluence"),
    ):
        header = json.loads((tmp_path / f"{path}.json").read_text())
        assert header["format"] == f"steerlab.{kind}" and header["model"] == info, path
        assert header["format_version"] >= 1 and "steerlab_version" in header
    tensors, meta = load_result(tmp_path / "scores" / "result", "InfluenceScores")
    assert torch.equal(tensors["top_index"], result["top_index"]) and meta["arguments"]["top_k"] == 3
    assert torch.equal(
        load_result(tmp_path / "self" / "result", "SelfInfluence")[0]["values"], selfs["values"]
    )
    # a factors file whose JSON half is missing (interrupted write) is recomputed from the stored sums
    (tmp_path / "lambda" / "factors.json").unlink()
    again = fit(tmp_path, model, task, train, seed=7)
    assert (tmp_path / "lambda" / "factors.json").exists()
    assert all(
        torch.equal(again.tensors[k], v)
        for k, v in load_tensors(tmp_path / "lambda" / "factors.safetensors")[0].items()
    )


if __name__ == "__main__":
    _worker()


class ModelLoaded(Exception):
    """Raised instead of loading a model, to prove that validation came first."""


def test_a_run_folder_that_cannot_be_written_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from steerlab.cli import main
    from steerlab.errors import UserError
    from steerlab.influence.commands import fit_run, score_run, self_run
    from steerlab.influence.config import FitArgs, ScoreArgs, SelfArgs

    def refuse(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr("steerlab.models.load_model", refuse)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run's parent folder should be")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some training text\n" * 50)
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"prompt": "a", "completion": "b"}\n')
    run = blocked / "run"
    calls = [
        lambda: fit_run(run, FitArgs(train=str(corpus))),
        lambda: score_run(run, ScoreArgs(queries=str(queries))),
        lambda: self_run(run, SelfArgs()),
    ]
    for call in calls:
        with pytest.raises(UserError, match=f"--run {run}: {blocked} is not a folder"):
            call()
    assert main(["influence", "fit", "--run", str(run), "--train", str(corpus)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"steerlab: error: --run {run}: {blocked} is not a folder"
    with pytest.raises(ModelLoaded):  # a writable run folder: the next step is loading the model
        fit_run(tmp_path / "run", FitArgs(train=str(corpus)))


def test_a_run_model_loads_directly_in_its_dtype(monkeypatch):
    from steerlab.influence.commands import load_run_model
    from steerlab.influence.config import FitArgs

    seen = {}

    def record(name, **kwargs):
        seen.update(kwargs, name=name)
        raise ModelLoaded

    monkeypatch.setattr("steerlab.models.load_model", record)
    with pytest.raises(ModelLoaded):
        load_run_model(FitArgs(train="corpus.txt", model="tiny", model_dtype="bfloat16"))
    assert seen == {"name": "tiny", "dtype": torch.bfloat16}


def test_full_score_matrix_is_streamed_to_safetensors_and_resumes(tmp_path, monkeypatch):
    """`full_scores=True` writes every score ([train, queries]) equal to the in-memory matrix, with the
    block strategy fitted through the pipeline; a stage interrupted after 3 batches resumes to the same
    file."""
    from safetensors.torch import load_file

    from steerlab.influence import stages
    from steerlab.influence.pipeline import fit, score

    model, task, train, queries = mlp_setup()
    factors = fit(tmp_path, model, task, train, seed=7, block_max_params=30)
    assert "2/block" in factors.tensors and "0/block" not in factors.tensors  # 3 x 8 = 24, 7 x 6 = 42
    pre = preconditioned_queries(query_gradients(model, task, queries), factors, "block", weight_decay=0.01)
    expected = pairwise_scores(model, task, list(train), pre)["scores"]

    def die(name, done):
        if (name, done) == ("full", 3):
            raise RuntimeError("interrupted")

    monkeypatch.setattr(stages, "_maybe_die", die)
    kw = {
        "strategy": "block",
        "weight_decay": 0.01,
        "full_scores": True,
        "name": "full",
        "checkpoint_every": 1,
    }
    with pytest.raises(RuntimeError, match="interrupted"):
        score(tmp_path, model, task, train, queries, **kw)
    assert (tmp_path / "full" / "full.safetensors.partial").exists()
    assert not (tmp_path / "full" / "full.safetensors").exists()
    monkeypatch.undo()
    result = score(tmp_path, model, task, train, queries, **kw)
    matrix = load_file(tmp_path / "full" / "full.safetensors")["scores"]
    assert matrix.shape == (len(train.x), 4) and matrix.dtype == torch.float64
    assert torch.allclose(matrix.T, expected, rtol=1e-10)
    assert torch.equal(result["top_index"], expected.topk(10, dim=1).indices)
    assert not (tmp_path / "full" / "full.safetensors.partial").exists()
