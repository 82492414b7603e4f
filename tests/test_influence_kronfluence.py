"""Agreement with Kronfluence on identical inputs (skipped when kronfluence is not installed)."""

from __future__ import annotations

import pytest
import torch

from conftest import micro_llama
from steerlab.influence import (
    LanguageModelTask,
    fit_factors,
    pairwise_scores,
    preconditioned_queries,
    query_gradients,
)
from steerlab.influence.data import lm_batch, query_batch
from steerlab.influence.kronfluence_compat import kronfluence_pairwise_scores

pytest.importorskip("kronfluence")
scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("strategy", ["ekfac", "identity"])
def test_pairwise_scores_agree_with_kronfluence(tmp_path, strategy):
    model = micro_llama()
    g = torch.Generator().manual_seed(0)
    seqs = [
        torch.randint(3, 64, (int(torch.randint(10, 17, (1,), generator=g)),), generator=g).tolist()
        for _ in range(16)
    ]  # padded
    train = [lm_batch(seqs[i : i + 8]) for i in range(0, 16, 8)]
    prompts = [torch.randint(3, 64, (6,), generator=g).tolist() for _ in range(4)]
    comps = [torch.randint(3, 64, (4,), generator=g).tolist() for _ in range(4)]
    queries = [query_batch(prompts, comps)]
    task = LanguageModelTask()
    damping = 1e-3
    factors = fit_factors(model, task, train, seed=None)
    pre = preconditioned_queries(
        query_gradients(model, task, queries), factors, strategy, damping, dtype=torch.float64
    )
    ours = pairwise_scores(model, task, train, pre)["scores"]
    theirs = kronfluence_pairwise_scores(
        model,
        list(task.modules(model)),
        train,
        queries,
        damping=damping,
        output_dir=tmp_path,
        strategy=strategy,
    )
    assert theirs.shape == ours.shape
    for q in range(len(ours)):
        assert scipy_stats.spearmanr(ours[q], theirs[q]).statistic >= 0.99
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-6
