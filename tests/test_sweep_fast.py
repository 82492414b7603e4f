"""The prefix-reusing sweep against the naive loop (every setting from scratch), and the dimension axis."""

import csv
import io

import pytest
import torch

from steerlab.data import ABDataset, ABItem, encode
from steerlab.errors import UserError
from steerlab.evaluate import prepare_neutral
from steerlab.evaluate.probability import last_token_logprobs
from steerlab.hooks import Positions
from steerlab.models.architectures import block
from steerlab.steering import SteeringVector
from steerlab.steering.dimensions import restrict
from steerlab.steering.metrics import behaviour_metric
from steerlab.steering.sweep import Grid, choose_setting, rows_to_csv, sweep

QUESTION = "Which?\n\nChoices:\n (A) {a}\n (B) {b}"
NEUTRAL = ["the cat sat on a mat", "one two three", "rain fell all day long on the old town"]


def _vector(layers=(0, 2, 3)) -> SteeringVector:
    torch.manual_seed(1)
    vectors = {layer: torch.randn(32, dtype=torch.float64) for layer in layers}
    return SteeringVector(vectors, {"residual_norms": {str(layer): 4.0 + layer for layer in layers}})


def _metrics(lm):
    """A/B scores (next-token probabilities of padded batches), and a two-call metric of letter
    probabilities after prompts (the shape of word preference, whose words a character tokenizer cannot
    tell apart)."""
    items = [
        ABItem(QUESTION.format(a="yes", b="no"), "(A)", "(B)"),
        ABItem(QUESTION.format(a="up", b="down"), "(B)", "(A)"),
        ABItem(QUESTION.format(a="hot", b="cold"), "(A)", "(B)"),
    ]
    prompts = [encode(lm.tokenizer, p) for p in ("it was a", "we felt so", "the food is", "a b")]

    def letters(model):
        logprobs = last_token_logprobs(model, prompts, batch_size=2)
        return {"score": logprobs[:, 40:44].softmax(-1)[:, 0]}

    return letters, behaviour_metric(lm, ABDataset(items, "ab"))


def _compare(fast, naive):
    assert len(fast) == len(naive)
    worst = 0.0
    for a, b in zip(fast, naive):
        assert {k: a[k] for k in ("vector", "dims", "dim_fraction", "layer", "fraction", "multiplier")} == {
            k: b[k] for k in ("vector", "dims", "dim_fraction", "layer", "fraction", "multiplier")
        }
        worst = max(worst, float((a["item_scores"] - b["item_scores"]).abs().max()))
        for key in ("perplexity", "kl"):
            worst = max(worst, abs(a[key] - b[key]))
    return worst


def test_fast_sweep_equals_the_naive_loop(tiny_lm):
    neutral = prepare_neutral(tiny_lm, NEUTRAL, batch_size=2)  # two forward calls per side-effect pass
    grid = Grid([0, 3], [-0.2, 0.3], dims=["first", "top", "random"], dim_fractions=[0.5, 1.0])
    for metric in _metrics(tiny_lm):
        kwargs = dict(neutral=neutral, progress=False, seed=3)
        fast = sweep(tiny_lm, _vector(), metric, grid, **kwargs)
        naive = sweep(tiny_lm, _vector(), metric, grid, reuse_prefix=False, **kwargs)
        assert len(fast) == 2 + 2 * 4 * 2 * 2  # baselines + layers x dim options x strengths x kinds
        assert _compare(fast, naive) <= 1e-10
        assert all(r["kl"] > 0 for r in fast if r["vector"] != "none")


def test_fast_sweep_at_chosen_positions(tiny_lm):
    neutral = prepare_neutral(tiny_lm, NEUTRAL, batch_size=2)
    metric = _metrics(tiny_lm)[1]
    kwargs = dict(neutral=neutral, positions=Positions.parse("from:-1"), progress=False)
    fast = sweep(tiny_lm, _vector(), metric, Grid([0, 2, 3], [-0.3, 0.3]), **kwargs)
    naive = sweep(tiny_lm, _vector(), metric, Grid([0, 2, 3], [-0.3, 0.3]), reuse_prefix=False, **kwargs)
    assert _compare(fast, naive) <= 1e-10
    base = fast[0]["score"]
    assert all(r["score"] != base for r in fast if r["vector"] != "none")
    assert all(r["kl"] == 0 for r in fast)  # only the last token is steered; its prediction is not scored


def test_settings_run_only_the_blocks_above_their_layer(tiny_lm):
    """Blocks up to a setting's layer run only in the baseline pass."""
    calls = {i: 0 for i in range(4)}
    handles = [
        block(tiny_lm.model, i).register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i in range(4)
    ]
    neutral = prepare_neutral(tiny_lm, NEUTRAL, batch_size=2)
    metric = _metrics(tiny_lm)[0]
    try:
        for i in calls:
            calls[i] = 0
        sweep(tiny_lm, _vector((1, 3)), metric, Grid([1, 3], [0.1]), neutral=neutral, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    per_pass = calls[0]  # the baseline: the metric's calls plus the two side-effect calls
    assert per_pass >= 3
    # layer 1: steering and random (2 measurements) run blocks 2 and 3; layer 3: the head only
    assert calls == {0: per_pass, 1: per_pass, 2: 3 * per_pass, 3: 3 * per_pass}


def test_a_metric_that_changes_its_calls_is_refused(tiny_lm):
    seen = []

    def drifting(lm):
        seen.append(1)
        ids = torch.tensor([[5, 6, 7, 8 + len(seen)]])
        return {"score": lm.model(input_ids=ids).logits[0, -1, :4].softmax(-1)}

    with pytest.raises(RuntimeError, match="forward calls differ"):
        sweep(tiny_lm, _vector(), drifting, Grid([2], [0.1]), progress=False)
    assert len(sweep(tiny_lm, _vector(), drifting, Grid([2], [0.1]), progress=False, reuse_prefix=False)) == 3


def test_dimension_rows_controls_and_csv(tiny_lm):
    vector = _vector()
    metric = _metrics(tiny_lm)[0]
    grid = Grid([2], [0.25], dims=["top-k", "first"], dim_fractions=[0.25, 1.0])
    assert grid.dimension_options() == [("all", 1.0), ("top", 0.25), ("first", 0.25)]
    rows = sweep(tiny_lm, vector, metric, grid, progress=False, seed=5)
    by = {(r["vector"], r["dims"], r["dim_fraction"]): r for r in rows if r["vector"] != "none"}
    top = restrict(vector, "top", 0.25)
    assert by["steering", "top", 0.25]["multiplier"] == pytest.approx(top.multiplier_for_fraction(2, 0.25))
    for option in (("all", 1.0), ("top", 0.25), ("first", 0.25)):
        # the same added norm (0.25 of the residual norm 6) for the vector and its control
        assert by[("steering", *option)]["added_norm"] == pytest.approx(1.5)
        assert by[("random", *option)]["added_norm"] == pytest.approx(1.5)
    parsed = list(csv.DictReader(io.StringIO(rows_to_csv(rows))))
    assert [(r["vector"], r["dims"], r["dim_fraction"]) for r in parsed][:3] == [
        ("none", "", ""),
        ("steering", "all", "1.0"),
        ("random", "all", "1.0"),
    ]


def test_dimension_grid_errors_name_the_option():
    with pytest.raises(UserError, match="--dims"):
        Grid([1], [0.1], dims=["middle"], dim_fractions=[0.5])
    with pytest.raises(UserError, match="--dim-fractions"):
        Grid([1], [0.1], dims=["first"], dim_fractions=[0.0])
    with pytest.raises(UserError, match="needs both"):
        Grid([1], [0.1], dims=["first"])


def test_choose_setting_over_dimension_options():
    def row(vector, dims, dim_fraction, fraction, score):
        return dict(
            vector=vector,
            layer=1,
            dims=dims,
            dim_fraction=dim_fraction,
            fraction=fraction,
            score=score,
            perplexity=10.0,
        )

    rows = [row("none", None, None, 0.0, 0.5)]
    rows += [row("steering", "all", 1.0, 0.1, 0.7), row("steering", "all", 1.0, -0.1, 0.3)]  # effect .4
    rows += [row("steering", "top", 0.5, 0.1, 0.8), row("steering", "top", 0.5, -0.1, 0.2)]  # effect .6
    rows += [row("steering", "first", 0.5, 0.1, 0.75), row("steering", "first", 0.5, -0.1, 0.25)]
    choice = choose_setting(rows)
    assert (choice.dims, choice.dim_fraction, choice.fraction) == ("top", 0.5, 0.1)
    assert choice.effect == pytest.approx(0.6)


def test_cli_sweeps_dimension_subsets(tmp_path, capsys):
    from conftest import char_tokenizer, tiny_model
    from steerlab.cli import main

    folder = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    _vector((1, 2)).save(tmp_path / "vec")
    out = tmp_path / "sweep.csv"
    argv = ["-q", "sweep", "--model", str(folder), "--vector", str(tmp_path / "vec"), "--layers", "2"]
    argv += ["--data", "builtin:sentiment-ab", "--limit", "2", "--fractions", "-0.1,0.1", "--out", str(out)]
    assert main([*argv, "--dims", "first,top", "--dim-fractions", "0.5,1"]) == 0
    rows = list(csv.DictReader(out.open()))
    options = {(r["dims"], r["dim_fraction"]) for r in rows if r["vector"] == "random"}
    assert options == {("all", "1.0"), ("first", "0.5"), ("top", "0.5")}
    assert len(rows) == 1 + 3 * 2 * 2
    for name in ("sweep.png", "sweep.first-0.5.png", "sweep.top-0.5.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert main([*argv, "--dims", "middle"]) == 2
    assert "--dims: unknown dimension selection 'middle'" in capsys.readouterr().err
    assert main([*argv, "--dim-fractions", "0,1"]) == 2
    assert "--dim-fractions: a fraction of the dimensions must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_resume_after_block_with_steering_inside_equals_a_full_steered_pass(family):
    from conftest import tiny_model
    from steerlab.hooks import read_residual, resume_after_block, steer

    model = tiny_model(family, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 4, 7], [1, 8, 3, 0, 0]])
    mask = (ids != 0).long()
    mask[0] = 1
    delta = {2: torch.randn(32, dtype=torch.float64)}  # cast to the block's float32 in both passes
    outputs = []
    with torch.no_grad():
        with read_residual(model, [2], lambda layer, hidden: outputs.append(hidden)):
            plain = model(input_ids=ids, attention_mask=mask).logits
        with steer(model, delta, multiplier=0.7):
            expected = model(input_ids=ids, attention_mask=mask).logits
        with resume_after_block(model, 2, outputs), steer(model, delta, multiplier=0.7):
            resumed = model(input_ids=ids, attention_mask=mask).logits
            with pytest.raises(ValueError, match="forward call 2 after block 2"):
                model(input_ids=ids, attention_mask=mask)
        assert torch.equal(resumed, expected)
        with resume_after_block(model, 2, [outputs[0][:1]]), pytest.raises(ValueError, match="does not fit"):
            model(input_ids=ids, attention_mask=mask)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)  # the blocks are back
        assert not torch.equal(plain, expected)


def test_side_effects_equal_a_float64_hand_computation(tiny_lm):
    from steerlab.evaluate import side_effects

    neutral = prepare_neutral(tiny_lm, NEUTRAL, batch_size=2)
    vector = _vector((1,))
    with torch.no_grad():
        assert side_effects(tiny_lm, neutral).kl == 0.0  # exactly: the same distributions
        with vector.apply(tiny_lm, layer=1, multiplier=0.5):
            got = side_effects(tiny_lm, neutral, batch_size=2)
            nll, kl = [], []
            for row in range(len(NEUTRAL)):
                ids = neutral.ids[row, neutral.mask[row].bool()]
                q = tiny_lm.model(ids[None]).logits[0, :-1].double().log_softmax(-1)
                p = neutral.base_logprobs[row, : len(ids) - 1].double()
                nll.append(-q.gather(-1, ids[1:, None])[:, 0])
                kl.append((p.exp() * (p - q)).sum(-1))
    assert got.perplexity == pytest.approx(float(torch.cat(nll).mean().exp()), rel=1e-6)
    assert got.kl == pytest.approx(float(torch.cat(kl).mean()), rel=1e-5) and got.kl > 1e-4
