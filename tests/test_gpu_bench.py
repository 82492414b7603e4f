"""The GPU benchmark runs on a CPU with a tiny model and ends with one JSON line of finite positive figures."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"

FIGURES = [
    "params_billions",
    "plain_tokens_per_s_b1",
    "steered_tokens_per_s_b1",
    "steered_over_plain_b1",
    "plain_tokens_per_s_b32",
    "steered_tokens_per_s_b32",
    "steered_over_plain_b32",
    "extraction_tokens_per_s",
    "extraction_over_forward",
    "ekfac_fit_tokens_per_s",
    "ekfac_fit_over_train_pass",
    "ekfac_score_tokens_per_s",
    "ekfac_score_over_train_pass",
    "hvp_per_s",
    "hvp_over_gradient",
    "hvp_dim_millions",
]
PIPELINE = [
    "pipeline_fit_tokens_per_s",
    "pipeline_fit_over_in_memory",
    "pipeline_score_tokens_per_s",
    "pipeline_score_over_in_memory",
]
# The tiny Llama by hand: embeddings and head 2 * 256 * 64; per layer q, o 64 * 64, k, v 64 * 32,
# gate, up, down 64 * 128 and two norms; the final norm.
TINY_PARAMS = 2 * 256 * 64 + 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
TINY_MLP_PARAMS = 2 * 3 * 64 * 128  # the HVP's parameters: the last two layers' MLPs


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


def _check_positive(result: dict, keys: list[str]) -> None:
    missing = [k for k in keys if k not in result]
    assert missing == []
    bad = {
        k: result[k]
        for k in keys
        if not (isinstance(result[k], float) and math.isfinite(result[k]) and result[k] > 0)
    }
    assert bad == {}


def test_tiny_cpu_run_ends_with_one_json_line_of_every_figure():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        check=True,
    )
    result = _last_json(out.stdout)
    _check_positive(result, [f"tiny_{k}" for k in FIGURES])
    assert result["skipped"] == [] and result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["tiny_params_billions"] == pytest.approx(TINY_PARAMS / 1e9, rel=1e-12)
    assert result["tiny_hvp_dim_millions"] == pytest.approx(TINY_MLP_PARAMS / 1e6, rel=1e-12)


def test_sections_past_the_budget_are_skipped_with_null_figures(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.main(["--tiny", "--device", "cpu", "--budget-s", "-1"])
    result = _last_json(capsys.readouterr().out)
    assert result["skipped"] == ["tiny_generation", "tiny_extraction", "tiny_ekfac", "tiny_hvp"]
    assert all(result[f"tiny_{k}"] is None for k in FIGURES[1:])
    assert result["tiny_params_billions"] == pytest.approx(TINY_PARAMS / 1e9, rel=1e-12)


@pytest.mark.slow
def test_gpu_sh_adds_the_torchrun_pipeline_step_to_the_one_json_line():
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=500,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = _last_json(out.stdout)
    _check_positive(result, [f"tiny_{k}" for k in FIGURES] + PIPELINE)
    assert result["pipeline_backend"] == "gloo" and result["pipeline_world_size"] == 1
