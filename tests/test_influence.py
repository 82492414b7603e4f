"""EK-FAC influence against exact quantities, in float64, with the Fisher materialised."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from steerlab.hooks.capture import module_shape, weight_gradient_matrix
from steerlab.influence import (
    ClassificationTask,
    LanguageModelTask,
    fit_factors,
    pairwise_scores,
    precondition,
    preconditioned_queries,
    query_gradients,
    self_scores,
)
from steerlab.influence.data import lm_batch, query_batch
from steerlab.influence.factors import per_example_gradients
from steerlab.influence.scores import STRATEGIES, damping_for, per_layer
from steerlab.models.architectures import layers_of

# ---------------------------------------------------------------- brute-force references


def autograd_gradients(model, task, examples, query=False):
    """Per-example gradients from `.grad` of the real parameters (independent of the hooks): {name: [N, out, in]}."""
    modules = task.modules(model)
    out = {n: [] for n in modules}
    for ex in examples:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        loss = task.query_loss(model, ex) if query else task.train_loss(model, ex)
        loss.backward()
        for name, m in modules.items():
            out[name].append(weight_gradient_matrix(m).detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


def approx_fisher_block(factors, name, strategy):
    """The materialised approximate Fisher of one module (row-major vec of the [out, in] gradient)."""
    if strategy == "identity":
        out, inp = factors.get(name, "lS").numel(), factors.get(name, "lA").numel()
        return torch.zeros(out * inp, out * inp, dtype=torch.float64)
    if strategy == "diagonal":
        return torch.diag(factors.get(name, "diag").reshape(-1))
    basis = torch.kron(factors.get(name, "QS"), factors.get(name, "QA"))
    if strategy == "kfac":
        lam = torch.outer(factors.get(name, "lS"), factors.get(name, "lA"))
    else:
        lam = factors.get(name, "lambda")
    return basis @ torch.diag(lam.reshape(-1)) @ basis.T


def brute_scores(factors, gq, gt, strategy, damping):
    """sum over modules of g_q^T (F_m + lambda_m I)^-1 g_n with the approximation materialised."""
    total = 0
    for name in gq:
        q, t = gq[name].reshape(len(gq[name]), -1), gt[name].reshape(len(gt[name]), -1)
        if strategy == "identity":
            total = total + q @ t.T
            continue
        F = approx_fisher_block(factors, name, strategy)
        d = damping_for(factors, name, strategy, damping)
        total = total + q @ torch.linalg.solve(F + d * torch.eye(len(F), dtype=F.dtype), t.T)
    return total


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------- fixtures


def tiny_mlp_problem(n=40, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x = torch.randn(n, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (n,))
    train = [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]
    singles = [(x[i : i + 1], y[i : i + 1]) for i in range(n)]
    qx = torch.randn(5, 6, dtype=torch.float64)
    qy = torch.randint(0, 4, (5,))
    queries = [(qx, qy)]
    q_singles = [(qx[i : i + 1], qy[i : i + 1]) for i in range(5)]
    return model, ClassificationTask(), train, singles, queries, q_singles


def tiny_llama(seed=0, hidden=8, inter=16, layers=2):
    from conftest import micro_llama

    return micro_llama(torch.float64, seed, hidden, inter, layers)


def tiny_gpt2(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=64, n_layer=2, n_head=2, n_embd=8, n_inner=16, n_positions=64)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double().eval()


def lm_problem(model, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [
        torch.randint(3, 64, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    train = [lm_batch(seqs[i : i + 4]) for i in range(0, n, 4)]  # right padding inside batches
    singles = [lm_batch([s]) for s in seqs]
    prompts = [torch.randint(3, 64, (5,), generator=g).tolist() for _ in range(3)]
    comps = [torch.randint(3, 64, (4,), generator=g).tolist() for _ in range(3)]
    queries = [query_batch(prompts, comps)]
    q_singles = [query_batch([p], [c]) for p, c in zip(prompts, comps)]
    return train, singles, queries, q_singles


def tiny_regression_problem(n=24, seed=3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    qx, qy = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    train = [(x[i : i + 6], y[i : i + 6]) for i in range(0, n, 6)]
    singles = [(x[i : i + 1], y[i : i + 1]) for i in range(n)]
    return (
        model,
        ClassificationTask(regression=True),
        train,
        singles,
        [(qx, qy)],
        [(qx[i : i + 1], qy[i : i + 1]) for i in range(3)],
    )


def problems():
    model, task, train, singles, queries, q_singles = tiny_mlp_problem()
    yield "mlp", model, task, train, singles, queries, q_singles
    yield "regression", *tiny_regression_problem()
    for name, build in [("llama", tiny_llama), ("gpt2", tiny_gpt2)]:
        model = build()
        yield (name, model, LanguageModelTask(), *lm_problem(model))


PROBLEMS = {p[0]: p[1:] for p in problems()}


@functools.cache
def cached(name):
    """Empirical-Fisher factors and autograd per-example gradients of a problem (train, queries)."""
    model, task, train, singles, queries, q_singles = PROBLEMS[name]
    factors = fit_factors(model, task, train, seed=None, diagonal=True)
    return (
        factors,
        autograd_gradients(model, task, singles),
        autograd_gradients(model, task, q_singles, query=True),
    )


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_per_example_gradients_match_autograd(name):
    """Hook-captured per-sequence gradients (padding masked, batched) equal autograd on each sequence alone."""
    model, task, train, singles, queries, q_singles = PROBLEMS[name]
    expected = autograd_gradients(model, task, q_singles, query=True)
    got = query_gradients(model, task, queries)
    for m in expected:
        assert rel_err(got[m], expected[m]) < 1e-10
    assert set(got) == set(task.modules(model))


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_ekfac_eigenvalues_are_the_fisher_diagonal_in_the_kfac_basis(name):
    model, task, train, singles, queries, q_singles = PROBLEMS[name]
    factors, grads, _ = cached(name)  # empirical Fisher: F below is exact
    for m, g in grads.items():
        g = g.reshape(len(g), -1)
        F = g.T @ g / len(g)
        basis = torch.kron(factors.get(m, "QS"), factors.get(m, "QA"))
        lam = torch.diagonal(basis.T @ F @ basis).reshape(factors.get(m, "lambda").shape)
        assert rel_err(factors.get(m, "lambda"), lam) < 1e-9
        assert rel_err(factors.get(m, "diag").reshape(-1), torch.diagonal(F)) < 1e-9
        err_ekfac = torch.linalg.norm(F - approx_fisher_block(factors, m, "ekfac"))
        err_kfac = torch.linalg.norm(F - approx_fisher_block(factors, m, "kfac"))
        assert err_ekfac <= err_kfac * (1 + 1e-12)


def test_kfac_factors_are_token_and_sequence_normalised():
    """A = mean over real tokens of a a^T, S = sum ds ds^T / sequences: checked on the MLP's first layer."""
    model, task, train, singles, *_ = PROBLEMS["mlp"]
    factors = fit_factors(model, task, train, seed=None)
    x = torch.cat([b[0] for b in train])
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    A = a.T @ a / len(a)
    QA, lA = factors.get("0", "QA"), factors.get("0", "lA")
    assert rel_err(QA @ torch.diag(lA) @ QA.T, A) < 1e-10
    # K-FAC A (x) S equals the Fisher exactly when every example has one token and the inputs are fixed
    g = autograd_gradients(model, task, singles)["0"]
    ds = g[:, :, -1]  # the bias column of a per-example gradient is ds itself
    S = ds.T @ ds / len(ds)
    QS, lS = factors.get("0", "QS"), factors.get("0", "lS")
    assert rel_err(QS @ torch.diag(lS) @ QS.T, S) < 1e-10


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_scores_equal_brute_force_with_materialised_approximation(name, strategy):
    model, task, train, singles, queries, q_singles = PROBLEMS[name]
    factors, gt, gq = cached(name)
    for damping in (None, 1e-3):
        expected = brute_scores(factors, gq, gt, strategy, damping)
        pre = preconditioned_queries(
            query_gradients(model, task, queries), factors, strategy, damping, dtype=torch.float64
        )
        got = pairwise_scores(model, task, train, pre, per_token=True)
        assert rel_err(got["scores"], expected) < 1e-6
        # per-token scores sum to the sequence score
        summed = torch.stack([t.sum(-1) for t in got["tokens"]], dim=1)
        assert rel_err(summed, got["scores"]) < 1e-9
        # per-module scores sum to the total
        assert rel_err(sum(per_layer(got["modules"], model).values()), got["scores"]) < 1e-12
        # self-influence
        selfs = self_scores(model, task, train, factors, strategy=strategy, damping=damping)
        brute_self = torch.diagonal(brute_scores(factors, gt, gt, strategy, damping))
        assert rel_err(selfs, brute_self) < 1e-6


def test_full_rank_compression_is_exact_and_low_rank_is_close():
    model, task, train, singles, queries, q_singles = PROBLEMS["llama"]
    factors = cached("llama")[0]
    grads = query_gradients(model, task, queries)
    full = pairwise_scores(model, task, train, preconditioned_queries(grads, factors, dtype=torch.float64))[
        "scores"
    ]
    rank8 = pairwise_scores(
        model, task, train, preconditioned_queries(grads, factors, rank=8, dtype=torch.float64)
    )
    assert rel_err(rank8["scores"], full) < 1e-9
    rank1 = pairwise_scores(
        model, task, train, preconditioned_queries(grads, factors, rank=1, dtype=torch.float64)
    )
    assert 1e-6 < rel_err(rank1["scores"], full) < 1.0  # an approximation, but not garbage: it differs


def test_true_fisher_samples_labels_deterministically():
    model, task, train, *_ = PROBLEMS["llama"]
    f1 = fit_factors(model, task, train, seed=3)
    f2 = fit_factors(model, task, train, seed=3)
    f3 = fit_factors(model, task, train, seed=4)
    emp = fit_factors(model, task, train, seed=None)
    key = next(k for k in f1.tensors if k.endswith("/lambda"))
    assert torch.equal(f1.tensors[key], f2.tensors[key])
    assert not torch.equal(f1.tensors[key], f3.tensors[key])
    assert not torch.allclose(f1.tensors[key], emp.tensors[key])


def exact_correlations(name, damping_scale=0.1):
    """Pearson correlation of each strategy's scores with exact (F + lambda I)^-1 scores (full F, all modules)."""
    model, task, train, singles, queries, q_singles = PROBLEMS[name]
    factors, gt, gq = cached(name)
    q = torch.cat([gq[m].reshape(len(gq[m]), -1) for m in gq], 1)
    t = torch.cat([gt[m].reshape(len(gt[m]), -1) for m in gt], 1)
    F = t.T @ t / len(t)
    damping = damping_scale * float(torch.diagonal(F).mean())
    exact = q @ torch.linalg.solve(F + damping * torch.eye(len(F), dtype=F.dtype), t.T)
    out = {}
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        s = brute_scores(factors, gq, gt, strategy, damping)
        out[strategy] = float(torch.corrcoef(torch.stack([s.reshape(-1), exact.reshape(-1)]))[0, 1])
    return out


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_correlation_with_exact_damped_inverse_fisher(name):
    for scale in (0.1, 0.01):
        corr = exact_correlations(name, scale)
        print(name, scale, {k: round(v, 4) for k, v in corr.items()})
    assert corr["ekfac"] > 0.5


def test_query_copied_from_training_ranks_it_first():
    model = tiny_llama(seed=2, hidden=32, inter=64, layers=2)
    task = LanguageModelTask()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 64, (24,), generator=g).tolist() for _ in range(16)]
    train = [lm_batch(seqs[i : i + 4]) for i in range(0, 16, 4)]
    factors = fit_factors(model, task, train, seed=0)
    copied = [5, 12]
    queries = [query_batch([seqs[i][:12] for i in copied], [seqs[i][12:] for i in copied])]
    for strategy in ("ekfac", "kfac", "identity"):
        pre = preconditioned_queries(query_gradients(model, task, queries), factors, strategy)
        scores = pairwise_scores(model, task, train, pre)["scores"]
        assert scores.argmax(1).tolist() == copied, strategy


def test_module_shapes_fold_bias_and_handle_conv1d():
    model = tiny_gpt2()
    shapes = {n: module_shape(m) for n, m in LanguageModelTask().modules(model).items()}
    assert shapes == {
        "transformer.h.0.mlp.c_fc": (16, 9),
        "transformer.h.0.mlp.c_proj": (8, 17),
        "transformer.h.1.mlp.c_fc": (16, 9),
        "transformer.h.1.mlp.c_proj": (8, 17),
    }


def test_precondition_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        precondition(torch.zeros(1, 2, 2), None, "x", "newton")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prefix_cache_starts_at_first_tracked_layer_with_identical_results(name):
    model, task, train, singles, queries, q_singles = PROBLEMS[name]
    from steerlab.models import decoder_layers

    blocks_before = list(decoder_layers(model))
    task = LanguageModelTask(layers=[1])
    cache: dict = {}
    from steerlab.influence import fit_covariance

    plain = fit_covariance(model, task, train, seed=None)
    cached_cov = fit_covariance(model, task, train, seed=None, cache=cache)
    assert sorted(cache) == list(range(len(train)))
    assert all("head_grad" in entry for entry in cache.values())  # later passes skip the head
    for k in plain.sums:
        assert torch.equal(plain.sums[k], cached_cov.sums[k])
    fast = [{**b, **cache[i]} for i, b in enumerate(train)]
    with torch.no_grad():
        for b, f in zip(train, fast):
            assert torch.allclose(task._forward(model, b), task._forward(model, f), rtol=0, atol=1e-12)
    factors = fit_factors(model, task, train, seed=None)
    pre = preconditioned_queries(query_gradients(model, task, queries), factors)
    s1 = pairwise_scores(model, task, train, pre)["scores"]
    s2 = pairwise_scores(model, task, fast, pre)["scores"]
    assert rel_err(s2, s1) < 1e-12
    assert list(decoder_layers(model)) == blocks_before  # restored


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["mlp", "llama"])  # rotation of the factors (mlp) / of G (llama)
def test_factored_query_gradients_precondition_like_dense(name, strategy):
    model, task, train, singles, queries, q_singles = PROBLEMS[name]
    factors = fit_factors(model, task, train, seed=0, diagonal=True)
    dense_grads = query_gradients(model, task, queries)
    factored = query_gradients(model, task, queries, factored=True)
    for n, (a, ds) in factored.items():
        assert rel_err(per_example_gradients(a, ds), dense_grads[n]) < 1e-12
    dense = preconditioned_queries(dense_grads, factors, strategy, dtype=torch.float64)
    got = preconditioned_queries(factored, factors, strategy, dtype=torch.float64)
    for n in dense.full:
        assert rel_err(got.full[n], dense.full[n]) < 1e-10, n


def test_several_label_draws_average_fisher_samples():
    from steerlab.influence import fit_covariance
    from steerlab.influence.factors import Accumulator, batch_seed, covariance_update
    from steerlab.influence.pass_cache import run_batch

    model, task, train, *_ = PROBLEMS["llama"]
    one = fit_covariance(model, task, train, seed=5)
    two = fit_covariance(model, task, train, seed=5, samples=2)
    manual = Accumulator()
    modules = task.modules(model)
    for i, batch in enumerate(train):
        for stage in ("covariance", "covariance:1"):  # the first draw is the single-draw run's
            cap = run_batch(model, task, modules, batch, sample_seed=batch_seed(5, i, stage))
            covariance_update(manual, cap, task.batch_size(batch), task.token_mask(batch))
    for key, value in manual.sums.items():
        assert torch.allclose(two.sums[key], value, rtol=1e-12), key
    name = next(iter(modules))
    assert torch.allclose(two.sums[f"{name}/A"], 2 * one.sums[f"{name}/A"], rtol=1e-12)  # inputs repeat
    assert not torch.allclose(two.sums[f"{name}/S"], 2 * one.sums[f"{name}/S"])  # gradients differ
    factors = fit_factors(model, task, train, seed=5, samples=2)
    assert factors.info["n_lambda"] == 2 * fit_factors(model, task, train, seed=5).info["n_lambda"]


def test_per_layer_groups_modules_by_the_block_that_holds_them():
    """Layers come from the model's structure: a module named like a block but outside the blocks keeps
    its name, and a model whose family is not registered has no layers."""
    model = tiny_llama()
    modules = dict(LanguageModelTask().modules(model))
    modules["lm_head"] = model.lm_head
    layers = layers_of(model, modules)
    assert layers == {
        "model.layers.0.mlp.gate_proj": 0,
        "model.layers.0.mlp.up_proj": 0,
        "model.layers.0.mlp.down_proj": 0,
        "model.layers.1.mlp.gate_proj": 1,
        "model.layers.1.mlp.up_proj": 1,
        "model.layers.1.mlp.down_proj": 1,
        "lm_head": None,
    }
    scores = {name: torch.tensor([float(i)]) for i, name in enumerate(modules)}
    grouped = per_layer(scores, model)
    assert {k: float(v) for k, v in grouped.items()} == {0: 3.0, 1: 12.0, "lm_head": 6.0}


class _Stack(nn.Module):
    """A classifier whose Linear layers sit in a ModuleList called `layers` (not decoder blocks)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 3)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


def test_pass_cache_skips_models_without_registered_blocks():
    """A module name like 'layers.0' is no decoder block: nothing is cached, the covariance is unchanged
    (guessing the layer from the name tried to hook a block the model does not have)."""
    from steerlab.influence import fit_covariance

    torch.manual_seed(0)
    model = _Stack().double()
    task = ClassificationTask()
    assert layers_of(model, task.modules(model)) == {"layers.0": None, "layers.1": None}
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    train = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    cache: dict = {}
    cached_cov = fit_covariance(model, task, train, seed=None, cache=cache)
    plain = fit_covariance(model, task, train, seed=None)
    assert cache == {}
    for k in plain.sums:
        assert torch.equal(plain.sums[k], cached_cov.sums[k])


def test_in_memory_fit_with_a_cache_equals_the_plain_fit():
    """fit_covariance records the cache, fit_lambda starts from it: the same factors as without."""
    from steerlab.influence import eigendecompose, fit_covariance, fit_lambda
    from steerlab.influence.factors import finish_lambda

    model, _, train, *_ = PROBLEMS["llama"]
    task = LanguageModelTask(layers=[1])
    modules = list(task.modules(model))
    cache: dict = {}
    eigen = eigendecompose(fit_covariance(model, task, train, seed=None, cache=cache), modules)
    fast = finish_lambda(eigen, fit_lambda(model, task, train, eigen, seed=None, cache=cache))
    plain = fit_factors(model, task, train, seed=None)
    assert sorted(cache) == list(range(len(train)))
    for k, v in plain.tensors.items():
        assert torch.allclose(fast.tensors[k].abs(), v.abs(), rtol=1e-9, atol=1e-12), k


def test_factors_save_as_a_result_file_and_load(tmp_path):
    import json

    from steerlab.influence import Factors
    from steerlab.io import ResultFileError, save_result, save_tensors

    factors = cached("mlp")[0]
    factors.save(tmp_path / "f.safetensors", model={"name": "tiny"})
    header = json.loads((tmp_path / "f.json").read_text())
    assert header["format"] == "steerlab.InfluenceFactors" and header["model"] == {"name": "tiny"}
    loaded = Factors.load(tmp_path / "f.safetensors")
    assert loaded.modules == factors.modules and loaded.info == factors.info
    assert all(torch.equal(loaded.tensors[k], v) for k, v in factors.tensors.items())
    # a factors file from before the JSON half (metadata in the safetensors header) still loads
    save_tensors(tmp_path / "old.safetensors", factors.tensors, {"modules": factors.modules, "info": {}})
    assert Factors.load(tmp_path / "old.safetensors").modules == factors.modules
    save_result(tmp_path / "v", {"x": torch.zeros(1)}, {}, kind="SteeringVector")
    with pytest.raises(ResultFileError, match="not a steerlab.InfluenceFactors"):
        Factors.load(tmp_path / "v.safetensors")
