"""Run Kronfluence (an optional, benchmark/test-only dependency) on the same inputs as steerlab.

Kronfluence's pairwise score with the query loss as its measurement is g_q^T (F + lambda I)^-1 g_z, with
its EK-FAC eigenvalues averaged over examples of summed losses: the same quantity and sign as
steerlab's score (positive = training on z lowers the query loss). Pass the damping explicitly on both
sides; Kronfluence's own default is 1e-8.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["kronfluence_available", "kronfluence_pairwise_scores"]


def kronfluence_available() -> bool:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def _rows(batches: Sequence[dict]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


def _make_task(module_names: list[str]):
    from kronfluence.task import Task as KTask

    class LMTask(KTask):
        def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
                :, :-1
            ]
            labels = batch["labels"][:, 1:]
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.float(), -1).reshape(-1, logits.shape[-1])
                    sampled = torch.multinomial(probs, 1).reshape(labels.shape)
                labels = torch.where(labels != -100, sampled, labels)
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum", ignore_index=-100
            )

        def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return list(module_names)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LMTask()


def kronfluence_pairwise_scores(
    model: nn.Module,
    module_names: Sequence[str],
    train: Sequence[dict],
    queries: Sequence[dict],
    *,
    damping: float,
    output_dir: str | Path,
    strategy: str = "ekfac",
    empirical: bool = True,
    dtype: torch.dtype = torch.float64,
    train_batch_size: int = 8,
    query_batch_size: int = 8,
    stage_times: dict | None = None,
) -> torch.Tensor:
    """[queries, train] Kronfluence scores for LM batches (dicts with input_ids/attention_mask/labels).

    The model is deep-copied (Kronfluence wraps its modules in place). `stage_times` receives wall times."""
    import time

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = _make_task(list(module_names))
    model = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(
        "steerlab",
        model,
        task,
        cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        output_dir=str(output_dir),
        disable_model_save=True,
    )
    factor_args = FactorArguments(
        strategy=strategy,
        use_empirical_fisher=empirical,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )
    score_args = ScoreArguments(
        damping_factor=damping, per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype
    )
    train_ds, query_ds = _ListDataset(_rows(train)), _ListDataset(_rows(queries))
    t0 = time.perf_counter()
    common = {
        "per_device_batch_size": train_batch_size,
        "factor_args": factor_args,
        "overwrite_output_dir": True,
    }
    if strategy in ("kfac", "ekfac"):
        analyzer.fit_covariance_matrices("factors", train_ds, **common)
    t_cov = time.perf_counter()
    if strategy in ("kfac", "ekfac"):
        analyzer.perform_eigendecomposition("factors", factor_args=factor_args, overwrite_output_dir=True)
    t_eig = time.perf_counter()
    if strategy in ("ekfac", "diagonal"):
        analyzer.fit_lambda_matrices("factors", train_ds, **common)
    elif strategy == "identity":
        analyzer.fit_all_factors("factors", train_ds, **common)
    t1 = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "scores",
        "factors",
        query_ds,
        train_ds,
        per_device_query_batch_size=query_batch_size,
        per_device_train_batch_size=train_batch_size,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    t2 = time.perf_counter()
    if stage_times is not None:
        stage_times.update(
            {
                "covariance": t_cov - t0,
                "eigen": t_eig - t_cov,
                "lambda": t1 - t_eig,
                "fit": t1 - t0,
                "score": t2 - t1,
            }
        )
    return analyzer.load_pairwise_scores("scores")["all_modules"].to(torch.float64)
