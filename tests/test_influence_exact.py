"""The exact-block strategy, the exact-expectation Fisher and the damping/precision options, against
brute-force formulas in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from steerlab.influence import (
    ClassificationTask,
    LanguageModelTask,
    fit_factors,
    pairwise_scores,
    preconditioned_queries,
    query_gradients,
    self_scores,
)
from steerlab.influence.config import FitArgs, InfluenceArgumentError
from steerlab.influence.scores import damping_for
from test_influence import (
    approx_fisher_block,
    autograd_gradients,
    lm_problem,
    rel_err,
    tiny_llama,
    tiny_mlp_problem,
)


def block_brute_scores(factors, grads_q, grads_t, blocks, damping, weight_decay=0.0):
    """sum over modules of g_q^T (F_m + d_m I)^-1 g_t, with F_m the exact Fisher block of the modules
    in `blocks` (from autograd per-example gradients) and the materialised EK-FAC elsewhere."""
    total = 0
    for name in grads_q:
        q = grads_q[name].reshape(len(grads_q[name]), -1)
        t = grads_t[name].reshape(len(grads_t[name]), -1)
        if name in blocks:
            F = blocks[name]
            d = 0.1 * float(torch.diagonal(F).mean()) if damping is None else damping
        else:
            F = approx_fisher_block(factors, name, "ekfac")
            d = damping_for(factors, name, "ekfac", damping)
        d += weight_decay
        total = total + q @ torch.linalg.solve(F + d * torch.eye(len(F), dtype=F.dtype), t.T)
    return total


def empirical_blocks(grads):
    return {n: g.reshape(len(g), -1).T @ g.reshape(len(g), -1) / len(g) for n, g in grads.items()}


def unit_blocks(grads):
    """Per module, the block-diagonal matrix of the per-output-unit blocks E[G[o] G[o]^T] (row-major vec:
    the weights of one output unit are contiguous)."""
    return {
        n: torch.block_diag(*[g[:, o].T @ g[:, o] / len(g) for o in range(g.shape[1])])
        for n, g in grads.items()
    }


@pytest.mark.parametrize("problem", ["mlp", "llama"])
@pytest.mark.parametrize("damping", [None, 1e-2])
@pytest.mark.parametrize("strategy", ["block", "unit"])
def test_block_strategies_equal_brute_force(problem, damping, strategy):
    """Exact blocks ("block") or per-output-unit blocks ("unit") where a module is small enough, EK-FAC
    elsewhere: pairwise and self-influence equal the materialised formula (1e-6 relative, float64)."""
    if problem == "mlp":
        model, task, train, singles, queries, q_singles = tiny_mlp_problem()
        # "0" (8 x 7: 56 weights, 8 x 49 = 392) falls back to EK-FAC, "2" (4 x 9: 36, 4 x 81 = 324) does not
        limit = {"block": 40, "unit": 350}[strategy]
    else:
        model, task = tiny_llama(), LanguageModelTask()
        train, singles, queries, q_singles = lm_problem(model)
        limit = 10**6  # every projection
    option = {"block": "block_max_params", "unit": "unit_max_params"}[strategy]
    factors = fit_factors(model, task, train, seed=None, **{option: limit})
    gt = autograd_gradients(model, task, singles)
    gq = autograd_gradients(model, task, q_singles, query=True)
    fitted = {n for n in factors.modules if f"{n}/{strategy}" in factors.tensors}
    materialised = empirical_blocks(gt) if strategy == "block" else unit_blocks(gt)
    blocks = {n: b for n, b in materialised.items() if n in fitted}
    assert blocks
    if problem == "mlp":
        assert set(blocks) == {"2"}  # the fallback is exercised
    for name, b in blocks.items():
        stored = factors.get(name, strategy)
        stored = stored if strategy == "block" else torch.block_diag(*stored)
        assert rel_err(stored, b) < 1e-10
    expected = block_brute_scores(factors, gq, gt, blocks, damping)
    pre = preconditioned_queries(query_gradients(model, task, queries), factors, strategy, damping)
    got = pairwise_scores(model, task, train, pre)["scores"]
    assert rel_err(got, expected) < 1e-6
    factored = query_gradients(model, task, queries, factored=True)
    got_factored = pairwise_scores(
        model, task, train, preconditioned_queries(factored, factors, strategy, damping)
    )["scores"]
    assert rel_err(got_factored, expected) < 1e-6
    self_expected = torch.diagonal(block_brute_scores(factors, gt, gt, blocks, damping))
    got_self = self_scores(model, task, train, factors, strategy=strategy, damping=damping)
    assert rel_err(got_self, self_expected) < 1e-6


def ggn_brute(model, task, x):
    """(1/N) sum_n J_n^T H_n J_n per tracked module, J_n the Jacobian of the outputs with respect to the
    module's [out, in] weights (bias column last), H_n = diag p - p p^T (classification) or I
    (regression); by autograd, one output at a time."""
    modules = task.modules(model)
    out = {}
    for name, m in modules.items():
        total = 0
        for xn in x:
            logits = model(xn[None])[0]
            rows = []
            for k in range(len(logits)):
                gw, gb = torch.autograd.grad(logits[k], (m.weight, m.bias), retain_graph=True)
                rows.append(torch.cat([gw, gb[:, None]], 1).reshape(-1))
            jac = torch.stack(rows)
            if task.regression:
                h = torch.eye(len(logits), dtype=logits.dtype)
            else:
                p = torch.softmax(logits.detach(), -1)
                h = torch.diag(p) - torch.outer(p, p)
            total = total + jac.T @ h @ jac
        out[name] = total / len(x)
    return out


@pytest.mark.parametrize("regression", [False, True])
def test_exact_expectation_fisher_is_the_gauss_newton_matrix(regression):
    """exact_fisher=C: the fitted blocks, the EK-FAC eigenvalues and S equal the Gauss-Newton matrix
    J^T H J computed from Jacobians, with no sampling noise (the seed does not matter)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 4, dtype=torch.float64) if regression else torch.randint(0, 4, (10,))
    train = [(x[:4], y[:4]), (x[4:], y[4:])]
    task = ClassificationTask(regression=regression, exact_fisher=4)
    f1 = fit_factors(model, task, train, seed=0, block_max_params=10**6, unit_max_params=10**6)
    f2 = fit_factors(model, task, train, seed=7, block_max_params=10**6)
    expected = ggn_brute(model, task, x)
    for name, ggn in expected.items():
        assert rel_err(f1.get(name, "block"), ggn) < 1e-10
        assert rel_err(f2.get(name, "block"), ggn) < 1e-10
        n_out = f1.get(name, "unit").shape[0]
        n_in = ggn.shape[0] // n_out
        units = torch.stack([ggn[o * n_in : (o + 1) * n_in, o * n_in : (o + 1) * n_in] for o in range(n_out)])
        assert rel_err(f1.get(name, "unit"), units) < 1e-10  # the GGN's diagonal blocks
        basis = torch.kron(f1.get(name, "QS"), f1.get(name, "QA"))
        lam = torch.diagonal(basis.T @ ggn @ basis).reshape(f1.get(name, "lambda").shape)
        assert rel_err(f1.get(name, "lambda"), lam) < 1e-10
    with pytest.raises(ValueError, match="exact_fisher=3"):
        fit_factors(model, ClassificationTask(exact_fisher=3), train, seed=0)


def problem_with_a_dead_input():
    """An MLP whose first input is always 0: A, the diagonal Fisher and the exact block are singular."""
    model, task, train, singles, queries, q_singles = tiny_mlp_problem()
    train = [(x.clone().index_fill_(1, torch.tensor([0]), 0.0), y) for x, y in train]
    return model, task, train, queries


ALL = {"diagonal": True, "block_max_params": 10**6, "unit_max_params": 10**6}


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac", "block", "unit"])
def test_zero_damping_with_a_singular_curvature_is_refused(strategy):
    model, task, train, queries = problem_with_a_dead_input()
    factors = fit_factors(model, task, train, seed=None, **ALL)
    grads = query_gradients(model, task, queries)
    with pytest.raises(InfluenceArgumentError, match="damping=0: module 0 "):
        preconditioned_queries(grads, factors, strategy, damping=0.0)
    with pytest.raises(InfluenceArgumentError, match="damping"):
        self_scores(model, task, train, factors, strategy=strategy, damping=0.0)
    scores = pairwise_scores(model, task, train, preconditioned_queries(grads, factors, strategy))["scores"]
    assert torch.isfinite(scores).all()  # the default damping is positive


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac", "block", "unit"])
def test_weight_decay_adds_to_the_damping(strategy):
    """weight_decay w adds w I to the curvature: the same scores as damping d + w; per module by name."""
    model, task, train, singles, queries, q_singles = tiny_mlp_problem()
    factors = fit_factors(model, task, train, seed=None, **ALL)
    grads = query_gradients(model, task, queries)

    def scores(**kw):
        pre = preconditioned_queries(grads, factors, strategy, **kw)
        return pairwise_scores(model, task, train, pre)["scores"]

    combined = scores(damping=0.03 + 0.02)
    assert rel_err(scores(damping=0.03, weight_decay=0.02), combined) < 1e-12
    assert (
        rel_err(scores(damping={"0": 0.03, "2": 0.03}, weight_decay={"0": 0.02, "2": 0.02}), combined) < 1e-12
    )
    assert rel_err(scores(damping=0.03), combined) > 1e-3
    heuristic = {n: damping_for(factors, n, strategy, None) for n in factors.modules}
    assert (
        rel_err(scores(weight_decay=0.02), scores(damping={n: v + 0.02 for n, v in heuristic.items()}))
        < 1e-12
    )
    if strategy == "block":  # against the formula: g_q^T (F_m + (d + w) I)^-1 g_t
        gt = autograd_gradients(model, task, singles)
        gq = autograd_gradients(model, task, q_singles, query=True)
        expected = block_brute_scores(factors, gq, gt, empirical_blocks(gt), 0.03, weight_decay=0.02)
        assert rel_err(scores(damping=0.03, weight_decay=0.02), expected) < 1e-6
    self_got = self_scores(model, task, train, factors, strategy=strategy, damping=0.03, weight_decay=0.02)
    assert (
        rel_err(self_got, self_scores(model, task, train, factors, strategy=strategy, damping=0.05)) < 1e-12
    )


def test_several_draws_with_the_data_labels_are_refused():
    model, task, train, *_ = tiny_mlp_problem()
    with pytest.raises(InfluenceArgumentError, match="samples=3"):
        fit_factors(model, task, train, seed=None, samples=3)
    with pytest.raises(InfluenceArgumentError, match="--samples"):
        FitArgs(train="corpus.txt", empirical=True, samples=3)
    FitArgs(train="corpus.txt", empirical=True)  # one draw is fine


def test_preconditioned_queries_keep_float64():
    model, task, train, singles, queries, q_singles = tiny_mlp_problem()
    factors = fit_factors(model, task, train, seed=None)
    grads = query_gradients(model, task, queries)
    for strategy in ("ekfac", "identity"):
        pre = preconditioned_queries(grads, factors, strategy)
        assert all(p.dtype == torch.float64 for p in pre.full.values())
    pre = preconditioned_queries(grads, factors, "ekfac", rank=2)
    assert all(p.dtype == torch.float64 for p in pre.left.values())
    pre = preconditioned_queries(grads, factors, "ekfac", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in pre.full.values())


def test_identity_warns_that_damping_is_ignored():
    model, task, train, singles, queries, q_singles = tiny_mlp_problem()
    grads = query_gradients(model, task, queries)
    with pytest.warns(UserWarning, match="identity strategy"):
        damped = preconditioned_queries(grads, None, "identity", damping=0.5)
    plain = preconditioned_queries(grads, None, "identity")
    for name in grads:
        assert torch.equal(damped.full[name], plain.full[name])


def test_block_sum_merges_repeated_one_token_rows_exactly():
    """Consecutive rows with equal inputs are merged (S_g (x) a a^T); the result equals the plain sum of
    per-row gradient outer products, also with a repeated input that is not consecutive."""
    from steerlab.influence.factors import block_sum, per_example_gradients

    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(4, 1, 5, generator=g, dtype=torch.float64)
    order = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 3, 3, 3])  # input 0 again after 2
    a = inputs[order]
    ds = torch.randn(len(a), 1, 3, generator=g, dtype=torch.float64)
    rows = per_example_gradients(a, ds).reshape(len(a), -1)
    assert rel_err(block_sum(a, ds), rows.T @ rows) < 1e-12
    distinct = torch.randn(6, 1, 5, generator=g, dtype=torch.float64)  # nothing to merge: plain product
    ds6 = torch.randn(6, 1, 3, generator=g, dtype=torch.float64)
    rows6 = per_example_gradients(distinct, ds6).reshape(6, -1)
    assert rel_err(block_sum(distinct, ds6), rows6.T @ rows6) < 1e-12
