"""EK-FAC influence functions (Grosse et al., 2023) for any nn.Module with Linear layers.

Quick start (in memory)::

    task = LanguageModelTask(layers=[-2, -1])
    factors = fit_factors(model, task, train_batches)              # K-FAC + EK-FAC eigenvalues
    pre = preconditioned_queries(query_gradients(model, task, query_batches), factors, "ekfac")
    result = pairwise_scores(model, task, train_batches, pre)      # [queries, train]

Scores are positive when training on the example raises the query's measurement (log-probability).
For large corpora use `steerlab.influence.pipeline` (streaming, on-disk stages, resume, torchrun).
"""

from steerlab.hooks.capture import capture, module_shape
from steerlab.influence.factors import (
    Accumulator,
    Factors,
    eigendecompose,
    fit_covariance,
    fit_factors,
    fit_lambda,
)
from steerlab.influence.full_scores import ScoreMatrix
from steerlab.influence.scores import (
    STRATEGIES,
    Preconditioned,
    compress,
    damping_for,
    has_block,
    pairwise_scores,
    per_layer,
    precondition,
    preconditioned_queries,
    query_gradients,
    score_captured,
    self_scores,
)
from steerlab.influence.tasks import ClassificationTask, LanguageModelTask, Task, linear_modules, mlp_modules

__all__ = [
    "STRATEGIES",
    "Accumulator",
    "ClassificationTask",
    "Factors",
    "LanguageModelTask",
    "Preconditioned",
    "ScoreMatrix",
    "Task",
    "capture",
    "compress",
    "damping_for",
    "eigendecompose",
    "fit_covariance",
    "fit_factors",
    "fit_lambda",
    "has_block",
    "linear_modules",
    "mlp_modules",
    "module_shape",
    "pairwise_scores",
    "per_layer",
    "precondition",
    "preconditioned_queries",
    "query_gradients",
    "score_captured",
    "self_scores",
]
