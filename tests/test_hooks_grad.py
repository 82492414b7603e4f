"""Gradients through the residual-stream hooks: `add` and `ablate` carry them, and they equal float64
central finite differences for per-layer and per-row tensors under every position spec."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from conftest import tiny_model
from steerlab.errors import UserError
from steerlab.hooks import Positions, ablate, add, capture_residual, steer
from steerlab.models import block

WIDTH = 32
LENGTHS = (5, 8, 6)  # real tokens per row, left-padded to 8
PAD = max(LENGTHS)
EPS = 1e-4


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def model():
    """A float64 tiny Llama computing every step in float64: sdpa attention (eager runs its softmax in
    float32) and torch's RMSNorm in place of Hugging Face's (which normalises in float32), so finite
    differences are exact to ~1e-10."""
    model = tiny_model("llama", attn="sdpa").requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                norm = torch.nn.RMSNorm(WIDTH, eps=child.variance_epsilon, dtype=torch.float64)
                norm.weight.data.copy_(child.weight.data)
                setattr(parent, name, norm.requires_grad_(False))
    return model


def _batch(extra: int = 0) -> dict[str, torch.Tensor]:
    """Three left-padded rows (LENGTHS real tokens), with `extra` more tokens appended to every row."""
    tokens = torch.randint(3, 100, (len(LENGTHS), PAD + 2), generator=torch.Generator().manual_seed(7))
    ids = torch.zeros(len(LENGTHS), PAD + extra, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(LENGTHS):
        ids[r, PAD - n :] = tokens[r, : n + extra]
        mask[r, PAD - n :] = 1
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


def _measure(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on every real position's log-probabilities (fixed random weights)."""
    weights = _rand(*logits.shape, seed=11)
    return (logits.log_softmax(-1) * weights * mask[:, -logits.shape[1] :, None]).sum()


def _prompt(model, deltas, spec) -> torch.Tensor:
    batch = _batch()
    with add(model, deltas, spec):
        return _measure(model(**batch).logits, batch["attention_mask"])


def _continued(model, deltas, spec) -> torch.Tensor:
    """An uncached generation-like pair of calls: the prompt, then the prompt and two decode tokens."""
    prompt, longer = _batch(), _batch(extra=2)
    with add(model, deltas, spec):
        model(**prompt)
        return _measure(model(**longer).logits, longer["attention_mask"])


def _cached(model, deltas, spec) -> torch.Tensor:
    """The prompt with a KV cache, then one cached decode step; gradients flow through the cache too."""
    prompt, longer = _batch(), _batch(extra=1)
    with add(model, deltas, spec):
        out = model(**prompt, use_cache=True)
        step = model(
            input_ids=longer["input_ids"][:, -1:],
            attention_mask=longer["attention_mask"],
            position_ids=longer["position_ids"][:, -1:],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return _measure(out.logits, prompt["attention_mask"]) + _measure(step.logits, longer["attention_mask"])


def _autograd(f: Callable, deltas: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    leaves = {layer: d.clone().requires_grad_(True) for layer, d in deltas.items()}
    grads = torch.autograd.grad(f(leaves), list(leaves.values()), allow_unused=True)
    return {layer: torch.zeros_like(d) if g is None else g for (layer, d), g in zip(leaves.items(), grads)}


@torch.no_grad()
def _finite_differences(f: Callable, deltas: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    out = {}
    for layer, delta in deltas.items():
        grad = torch.zeros_like(delta).reshape(-1)
        for i in range(grad.numel()):
            shifted = []
            for sign in (1, -1):
                moved = delta.clone()
                moved.reshape(-1)[i] += sign * EPS
                shifted.append(f({**deltas, layer: moved}))
            grad[i] = (shifted[0] - shifted[1]) / (2 * EPS)
        out[layer] = grad.reshape(delta.shape)
    return out


SPECS = {
    "all": Positions.all(),
    "sink": Positions.all(include_sink=True),
    "from2": Positions.from_position(2),
    "from-2": Positions.from_position(-2),
    "per-row-from": Positions.from_position([1, 4, 3]),
    "at": Positions.at(1, 3),
    "at-sink": Positions.at(0, 4, include_sink=True),
    "decode": Positions.decode_only(),
}
RUNS = {"prompt": _prompt, "continued": _continued, "cached": _cached}
CASES = [(run, spec) for run in RUNS for spec in SPECS if run == "prompt" or spec in ("all", "decode", "at")]


@pytest.mark.parametrize(("run", "spec"), CASES, ids=[f"{r}-{s}" for r, s in CASES])
def test_gradient_equals_finite_differences(model, run, spec):
    """A per-layer delta at layer 1 and a per-row delta at layer -2 (=2), both at once."""
    deltas = {1: _rand(WIDTH, seed=1) * 0.3, -2: _rand(len(LENGTHS), WIDTH, seed=2) * 0.3}

    def f(d):
        return RUNS[run](model, d, SPECS[spec])

    exact, numeric = _autograd(f, deltas), _finite_differences(f, deltas)
    for layer in deltas:
        scale = numeric[layer].norm()
        if run == "prompt" and spec == "decode":
            assert scale < 1e-9 and exact[layer].abs().max() == 0  # no prompt position is a decode step
            continue
        assert scale > 1e-3
        assert (exact[layer] - numeric[layer]).norm() <= 1e-6 * scale, layer


EXPECTED = {  # real-token positions that receive the delta in a row of n prompt tokens
    "all": lambda n: range(1, n),
    "sink": lambda n: range(n),
    "from2": lambda n: range(2, n),
    "from-2": lambda n: range(n - 2, n),
    "at": lambda n: [1, 3],
    "at-sink": lambda n: [0, 4],
    "decode": lambda n: [],
}


@pytest.mark.parametrize("per_row", [False, True], ids=["per-layer", "per-row"])
@pytest.mark.parametrize("spec", list(EXPECTED))
def test_gradient_is_the_sum_over_selected_positions(model, spec, per_row):
    """d loss / d delta = sum over the selected (row, position) of d loss / d residual, padding-aware."""
    batch = _batch()
    delta = (_rand(len(LENGTHS), WIDTH, seed=3) if per_row else _rand(WIDTH, seed=3)).requires_grad_(True)
    probe = torch.zeros(len(LENGTHS), PAD, WIDTH, dtype=torch.float64, requires_grad=True)
    with add(model, {1: delta}, SPECS[spec]):
        handle = block(model, 1).register_forward_hook(
            lambda _m, _a, out: out + probe if isinstance(out, torch.Tensor) else (out[0] + probe, *out[1:])
        )
        try:
            loss = _measure(model(**batch).logits, batch["attention_mask"])
        finally:
            handle.remove()
    got, per_position = torch.autograd.grad(loss, [delta, probe], allow_unused=True)
    expected = torch.zeros(len(LENGTHS), WIDTH, dtype=torch.float64)
    for r, n in enumerate(LENGTHS):
        for p in EXPECTED[spec](n):
            expected[r] += per_position[r, PAD - n + p]
    expected = expected if per_row else expected.sum(0)
    got = torch.zeros_like(expected) if got is None else got
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _target_loss(model, deltas, batch, targets) -> torch.Tensor:
    """Per-row negative log-probability of `targets` after the last prompt token."""
    with add(model, deltas, Positions.all()):
        logits = model(**batch).logits[:, -1]
    return -logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("per_row", [False, True], ids=["per-layer", "per-row"])
def test_optimising_a_delta_reduces_the_loss(model, per_row):
    batch = _batch()
    targets = torch.tensor([5, 17, 40])
    shape = (len(LENGTHS), WIDTH) if per_row else (WIDTH,)
    delta = torch.zeros(*shape, dtype=torch.float32, requires_grad=True)  # cast to float64 in the hook
    optimiser = torch.optim.Adam([delta], lr=0.2)
    before = _target_loss(model, {2: delta}, batch, targets).detach()
    for _ in range(15):
        optimiser.zero_grad()
        _target_loss(model, {2: delta}, batch, targets).sum().backward()
        optimiser.step()
    after = _target_loss(model, {2: delta}, batch, targets).detach()
    assert delta.grad is not None and delta.grad.dtype == torch.float32
    # The tiny model's head bounds how far a residual edit can move a log-probability (~1 nat).
    if per_row:
        assert (after < before - 0.3).all(), (before, after)
    else:
        assert after.sum() < before.sum() - 0.5, (before, after)


def _hook_count(model) -> int:
    return len(model._forward_pre_hooks) + sum(len(b._forward_hooks) for b in model.model.layers)


def test_hooks_removed_after_exceptions(model):
    before = _hook_count(model)
    delta = torch.zeros(WIDTH, dtype=torch.float64, requires_grad=True)
    for context in (
        lambda: add(model, {0: delta, -1: delta}),
        lambda: ablate(model, _rand(WIDTH, seed=4), layers=[1, 2]),
    ):
        with pytest.raises(RuntimeError, match="boom"), context():
            assert _hook_count(model) == before + 3
            raise RuntimeError("boom")
        assert _hook_count(model) == before
    batch = _batch()
    with pytest.raises(UserError, match="the delta for layer 1 has 2 rows for a batch of 3"):
        with add(model, {1: torch.zeros(2, WIDTH, dtype=torch.float64)}):
            model(**batch)
    assert _hook_count(model) == before


def test_bad_deltas_are_refused_before_any_hook(model):
    before = _hook_count(model)
    with pytest.raises(UserError, match=r"layer 1 has shape \(31,\); expected \(32,\) or \(batch, 32\)"):
        add(model, {1: torch.zeros(31)})
    with pytest.raises(UserError, match="layers 3 and -1 are the same layer 3"):
        add(model, {3: torch.zeros(WIDTH), -1: torch.zeros(WIDTH)})
    with pytest.raises(IndexError, match="layer 9 is out of range"):
        add(model, {9: torch.zeros(WIDTH)})
    with pytest.raises(UserError, match="direction for layer 2 is zero"):
        ablate(model, {2: torch.zeros(WIDTH)})
    assert _hook_count(model) == before


@pytest.mark.parametrize("spec", ["all", "from-2", "at", "decode"])
def test_steer_and_add_give_identical_logits(model, spec):
    batch = _batch(extra=1)
    v = _rand(WIDTH, seed=5)
    with steer(model, {-3: v}, 2.5, SPECS[spec]):
        steered = model(**batch).logits
    with add(model, {1: 2.5 * v}, SPECS[spec]):
        added = model(**batch).logits
    with add(model, {1: (2.5 * v).expand(len(LENGTHS), WIDTH)}, SPECS[spec]):
        per_row = model(**batch).logits
    assert torch.equal(steered, added) and torch.equal(added, per_row)
    if spec != "decode":
        assert (steered - model(**batch).logits).abs().max() > 1e-3


def test_per_row_deltas_cached_and_uncached_generation_agree(model):
    batch = _batch()
    deltas = {1: _rand(len(LENGTHS), WIDTH, seed=6) * 3.0}
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    outs = {}
    for cache in (True, False):
        with add(model, deltas, Positions.from_position(-1)):
            outs[cache] = model.generate(use_cache=cache, **kwargs)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    torch.testing.assert_close(
        torch.stack(outs[True].logits), torch.stack(outs[False].logits), rtol=1e-8, atol=1e-8
    )


@pytest.mark.parametrize("per_row", [False, True], ids=["one", "per-row"])
def test_ablate_projects_out_the_direction(model, per_row):
    batch = _batch()
    d = _rand(len(LENGTHS), WIDTH, seed=8) if per_row else _rand(WIDTH, seed=8)
    spec = Positions.from_position(-3)
    with capture_residual(model, [1]) as plain:
        model(**batch)
    with ablate(model, {1: d}, positions=spec), capture_residual(model, [1]) as ablated:
        model(**batch)
    h = plain[1]
    u = (d / d.norm(dim=-1, keepdim=True)).expand(len(LENGTHS), WIDTH)
    expected = h.clone()
    for r in range(len(LENGTHS)):
        for t in range(PAD - 3, PAD):
            expected[r, t] = h[r, t] - torch.dot(h[r, t], u[r]) * u[r]
    torch.testing.assert_close(ablated[1], expected, rtol=1e-12, atol=1e-12)
    along = torch.einsum("rtd,rd->rt", ablated[1], u)[:, PAD - 3 :]
    assert along.abs().max() < 1e-12


def test_ablate_gradient_equals_finite_differences(model):
    """Gradients reach a (non-unit) direction through the normalisation and the projection."""
    batch = _batch()
    directions = {2: _rand(WIDTH, seed=9)}

    def f(d):
        with ablate(model, d, positions=Positions.from_position(2)):
            return _measure(model(**batch).logits, batch["attention_mask"])

    exact, numeric = _autograd(f, directions), _finite_differences(f, directions)
    scale = numeric[2].norm()
    assert scale > 1e-3
    assert (exact[2] - numeric[2]).norm() <= 1e-6 * scale


def test_ablate_single_direction_defaults_to_every_layer(model):
    batch = _batch()
    d = _rand(WIDTH, seed=10)
    with ablate(model, d), capture_residual(model, [0, 1, 2, 3]) as ablated:
        model(**batch)
    real = batch["attention_mask"].bool().clone()
    real[:, :] &= torch.arange(PAD) > torch.tensor([PAD - n for n in LENGTHS])[:, None]  # not the sink
    for layer in range(4):
        along = ablated[layer] @ (d / d.norm())
        assert along[real].abs().max() < 1e-12, layer
