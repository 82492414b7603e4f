"""Pair search: the batched metric equals the demo's, the one-hot gradient equals finite differences, greedy
selection finds planted answers, seeds reproduce, checkpoints resume, and bad input is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import char_tokenizer, tiny_model
from steerlab.data import PairedTexts, PromptSet, encode, load_builtin
from steerlab.data.builtin import load_length_pairs
from steerlab.errors import UserError
from steerlab.evaluate import prepare_neutral
from steerlab.evaluate.probability import WordPreference, word_preference
from steerlab.finetune.pair_search import (
    PairSearchResult,
    SearchConfig,
    effect_per_norm,
    gcg_search,
    greedy_select,
    onehot_gradient,
    pair_differences,
    probe_for_prompts,
    probe_scores,
    run_search,
    soft_effect,
    two_way_bootstrap,
)
from steerlab.hooks import add
from steerlab.models import wrap
from steerlab.steering import extract_mean_difference

LAYER = 1
PROMPTS = PromptSet(["the day was", "my trip is", "a cat sat on", "we found it"])


def _words(lm) -> dict[str, list[int]]:
    ids = lm.tokenizer.convert_tokens_to_ids
    return {"positive": [ids("g"), ids("h")], "negative": [ids("b"), ids("z")]}


@pytest.fixture
def probe(tiny_lm):
    return probe_for_prompts(tiny_lm, PROMPTS, _words(tiny_lm), LAYER, norm=3.0)


@pytest.fixture
def exact_lm():
    """The tiny Llama computing every step in float64: sdpa attention (eager runs its softmax in float32)
    and torch's RMSNorm in place of Hugging Face's (which normalises in float32), as in test_hooks_grad."""
    model = tiny_model("llama", attn="sdpa").requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                norm = torch.nn.RMSNorm(32, eps=child.variance_epsilon, dtype=torch.float64)
                norm.weight.data.copy_(child.weight.data)
                setattr(parent, name, norm.requires_grad_(False))
    return wrap(model, char_tokenizer(), name="tiny-llama-float64")


def test_probe_scores_equal_word_preference_under_add(tiny_lm, probe):
    words = _words(tiny_lm)
    prepared = WordPreference([encode(tiny_lm.tokenizer, p) for p in PROMPTS], *words.values())
    deltas = torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = probe_scores(probe, deltas, max_rows=8)  # chunks of two candidates
    for delta, row in zip(deltas, got):
        with torch.no_grad(), add(tiny_lm, {LAYER: delta}):
            want = word_preference(tiny_lm, prepared)
        torch.testing.assert_close(row, want, rtol=0, atol=1e-6)  # word_preference rounds to float32
    per_norm = effect_per_norm(probe, deltas[:1] * 7.0)  # direction only
    unit = deltas[0] / deltas[0].norm() * 3.0
    manual = (probe_scores(probe, unit[None]) - probe_scores(probe, -unit[None])) / 3.0
    torch.testing.assert_close(per_norm, manual, rtol=0, atol=1e-12)


def test_pair_differences_mean_is_the_mean_difference_vector(tiny_lm):
    pairs = PairedTexts(["good day", "so nice!", "happy"], ["bad day", "so sad!!", "gloom"])
    ours = pair_differences(tiny_lm, pairs, LAYER, batch_size=2).mean(0)
    theirs = extract_mean_difference(tiny_lm, pairs, [LAYER], progress=False).vectors[LAYER]
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=1e-6)


def test_onehot_gradient_matches_finite_differences_and_exact_swaps(exact_lm):
    tiny_lm = exact_lm
    probe = probe_for_prompts(tiny_lm, PROMPTS, _words(tiny_lm), LAYER, norm=3.0)
    tok = tiny_lm.tokenizer
    pos, neg = encode(tok, "glad"), encode(tok, "sad!")
    grad_pos, grad_neg, value = onehot_gradient(probe, pos, neg)
    exact = effect_per_norm(probe, pair_differences(tiny_lm, [(pos, neg)], LAYER)).mean()
    assert value == pytest.approx(float(exact), abs=1e-12)  # relaxed = exact at a vertex
    vocab = grad_pos.shape[1]
    base_pos = F.one_hot(torch.tensor(pos), vocab).double()
    base_neg = F.one_hot(torch.tensor(neg), vocab).double()
    eps = 1e-5
    for side, t, v in [("pos", 1, 40), ("pos", 3, 70), ("neg", 2, 55), ("neg", 0, 12)]:
        bump = torch.zeros_like(base_pos if side == "pos" else base_neg)
        bump[t, v] = eps

        def f(sign: float, side=side, bump=bump) -> float:
            p = base_pos + sign * bump if side == "pos" else base_pos
            n = base_neg + sign * bump if side == "neg" else base_neg
            with torch.no_grad():
                return float(soft_effect(probe, p, n))

        numeric = (f(1.0) - f(-1.0)) / (2 * eps)
        analytic = float((grad_pos if side == "pos" else grad_neg)[t, v])
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    swapped = list(pos)
    swapped[2] = 70
    with torch.no_grad():
        relaxed = float(soft_effect(probe, F.one_hot(torch.tensor(swapped), vocab).double(), base_neg))
    by_tokens = effect_per_norm(probe, pair_differences(tiny_lm, [(swapped, neg)], LAYER)).mean()
    assert relaxed == pytest.approx(float(by_tokens), abs=1e-12)


def _cosine_score(target: torch.Tensor):
    return lambda directions: F.cosine_similarity(directions, target[None], dim=-1)


def test_greedy_picks_the_planted_pair_and_stops():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(16, generator=gen)
    diffs = torch.randn(10, 16, generator=gen)
    diffs[6] = 2.5 * target
    out = greedy_select(_cosine_score(target), diffs, max_pairs=5)
    assert out["selected"] == [6] and out["scores"] == [pytest.approx(1.0)]


def test_greedy_combines_complementary_pairs():
    e = torch.eye(8)
    diffs = torch.stack([e[0], -e[0], 0.3 * e[3] + 0.1 * e[4], e[1]])
    out = greedy_select(_cosine_score(e[0] + e[1]), diffs, max_pairs=4)
    assert sorted(out["selected"]) == [0, 3] and out["scores"][-1] == pytest.approx(1.0)


def test_greedy_resumes_from_its_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(3)
    target, diffs = torch.randn(12, generator=gen), torch.randn(20, 12, generator=gen)
    score = _cosine_score(target)
    full = greedy_select(score, diffs, max_pairs=4)
    path = tmp_path / "greedy.json"
    greedy_select(score, diffs, max_pairs=2, checkpoint=path, key="a")
    assert json.loads(path.read_text())["selected"] == full["selected"][:2]
    calls = []

    def counted(directions):
        calls.append(len(directions))
        return score(directions)

    resumed = greedy_select(counted, diffs, max_pairs=4, checkpoint=path, key="a")
    assert resumed == full and calls[0] == len(diffs) - 2  # started at step 3
    fresh = greedy_select(counted, diffs, max_pairs=1, checkpoint=path, key="other")
    assert fresh["selected"] == full["selected"][:1]  # another search's checkpoint is ignored


def test_gcg_improves_reproduces_and_resumes(tiny_lm, probe, tmp_path):
    tok = tiny_lm.tokenizer
    start = (encode(tok, "nice"), encode(tok, "grim"))
    kwargs = dict(steps=4, top_k=8, candidates=6, seed=5)
    first = gcg_search(probe, start, **kwargs)
    again = gcg_search(probe, start, **kwargs)
    assert first == again
    assert np.all(np.diff(first["scores"]) >= 0) and len(first["scores"]) == 5
    assert first["scores"][-1] > first["scores"][0]  # a random tiny model still has a gradient to climb
    final = effect_per_norm(
        probe, pair_differences(tiny_lm, [(first["positive_ids"], first["negative_ids"])], LAYER)
    )
    assert float(final.mean()) == pytest.approx(first["scores"][-1], abs=1e-12)
    path = tmp_path / "gcg.json"
    gcg_search(probe, start, **{**kwargs, "steps": 2}, checkpoint=path, key="k")
    assert json.loads(path.read_text())["step"] == 2
    resumed = gcg_search(probe, start, **kwargs, checkpoint=path, key="k")
    assert resumed == first
    other = gcg_search(probe, start, **{**kwargs, "seed": 6})
    assert other["swaps"] != first["swaps"]


def test_bad_input_is_refused_naming_the_argument(tiny_lm, probe, tmp_path):
    tok = tiny_lm.tokenizer
    start = (encode(tok, "nice"), encode(tok, "grim"))
    with pytest.raises(UserError, match="--top-k"):
        gcg_search(probe, start, steps=1, top_k=0, candidates=2)
    with pytest.raises(UserError, match="--candidates"):
        gcg_search(probe, start, steps=1, top_k=2, candidates=-1)
    with pytest.raises(UserError, match="--max-pairs"):
        greedy_select(lambda d: d.sum(-1), torch.ones(3, 4), max_pairs=0)
    with pytest.raises(UserError, match="--pool"):
        greedy_select(lambda d: d.sum(-1), torch.ones(0, 4), max_pairs=2)
    with pytest.raises(UserError, match="--top-k"):
        SearchConfig(top_k=0).check()
    pairs = PairedTexts(["good day"], ["bad day"])
    with pytest.raises(UserError, match="--pool"):
        run_search(tiny_lm, pairs, PairedTexts([], []), PROMPTS, PROMPTS, _words(tiny_lm), SearchConfig())
    with pytest.raises(UserError, match="--layer"):
        run_search(tiny_lm, pairs, pairs, PROMPTS, PROMPTS, _words(tiny_lm), SearchConfig(layer=3))
    bad = tmp_path / "lengths.json"
    bad.write_text(json.dumps({"0": {"positive": ["a"], "negative": ["b"]}}))
    with pytest.raises(UserError, match="field '0'.*length of at least 1"):
        load_length_pairs(bad)


def test_run_search_end_to_end_and_result_round_trip(tiny_lm, tmp_path):
    handwritten = PairedTexts(["good day", "so nice!", "happy"], ["bad day", "so sad!!", "gloom"])
    pool = PairedTexts(["great", "fine fun", "yes", "bright"], ["awful", "dull pain", "no!", "grey!!"])
    lengths = {1: PairedTexts(["g", "j"], ["b", "k"]), 4: PairedTexts(["glad", "warm"], ["sad!", "cold"])}
    config = SearchConfig(layer=LAYER, max_pairs=2, steps=2, top_k=4, candidates=4)
    result = run_search(
        tiny_lm, handwritten, pool, PROMPTS[:2], PROMPTS[2:], _words(tiny_lm), config,
        lengths=lengths, checkpoints=tmp_path, progress=False,
    )  # fmt: skip
    assert (tmp_path / "greedy.json").is_file() and (tmp_path / "gcg.json").is_file()
    test = result.test
    chosen = next(r for r in result.candidates if r["vector"] == test["searched"])
    best_val = max(
        r["validation_effect_per_norm"]
        for r in result.candidates
        if r["vector"] not in ("handwritten", "random")
    )
    assert chosen["validation_effect_per_norm"] == pytest.approx(best_val)  # chosen on validation only
    assert test["effect_per_norm_searched"] == pytest.approx(chosen["effect_per_norm"])
    assert test["ci_low_difference"] <= test["difference"] <= test["ci_high_difference"]
    assert [r["length"] for r in result.lengths] == [1, 4]
    assert result.lengths[0]["measured_tokens"] == pytest.approx(len(encode(tiny_lm.tokenizer, "g")))
    again = run_search(
        tiny_lm, handwritten, pool, PROMPTS[:2], PROMPTS[2:], _words(tiny_lm), config, progress=False
    )
    assert again.test == result.test and again.gcg == result.gcg  # same seed, same search
    result.save(tmp_path / "result")
    loaded = PairSearchResult.load(tmp_path / "result")
    assert loaded.test == result.test and loaded.greedy == result.greedy
    for name, vec in result.directions.items():
        torch.testing.assert_close(loaded.directions[name], vec.float())
        assert float(vec.norm()) == pytest.approx(1.0)


def test_two_way_bootstrap():
    constant = np.full((4, 6), 0.25)
    assert two_way_bootstrap(constant) == pytest.approx((0.25, 0.25, 0.25))
    rng = np.random.default_rng(0)
    mean, low, high = two_way_bootstrap(rng.normal(size=(8, 20)) + 1.0)
    assert low < mean < high and low < 1.0 < high


def test_builtin_pool_and_lengths():
    pool = load_builtin("sentiment-pool")
    assert len(pool) >= 32 and len(set(pool.positive)) == len(pool)
    lengths = load_builtin("sentiment-lengths")
    assert list(lengths) == [1, 2, 4, 8, 16, 32, 64]
    assert all(len(p) >= 6 for p in lengths.values())


@pytest.mark.slow
def test_smollm2_metric_and_lengths(smollm2):
    """On the embedded model: the batched metric equals the demo's word preference under `add`, and the
    length pairs have their nominal token counts (up to 16 tokens exactly, longer ones within a third)."""
    words = load_builtin("sentiment-words")
    prompts = load_builtin("sentiment-prompts")[:6]
    probe = probe_for_prompts(smollm2, prompts, words, 20, norm=8.0)
    from steerlab.evaluate.probability import prepare_word_preference

    prepared = prepare_word_preference(smollm2, prompts.prompts, words["positive"], words["negative"])
    delta = torch.randn(576, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad(), add(smollm2, {20: delta}):
        want = word_preference(smollm2, prepared)
    torch.testing.assert_close(probe_scores(probe, delta[None])[0], want, rtol=0, atol=1e-5)
    for length, pairs in load_builtin("sentiment-lengths").items():
        counts = [len(encode(smollm2.tokenizer, t)) for t in [*pairs.positive, *pairs.negative]]
        if length <= 4:
            assert counts == [length] * len(counts), (length, counts)
        else:
            assert abs(np.mean(counts) - length) <= length / 3, (length, counts)


def test_report_files(tiny_lm, tmp_path):
    from steerlab.finetune.pair_search_report import write_report

    handwritten = PairedTexts(["good day", "so nice!"], ["bad day", "so sad!!"])
    pool = PairedTexts(["great", "yes"], ["awful", "no!"])
    lengths = {1: PairedTexts(["g", "j"], ["b", "k"]), 2: PairedTexts(["go", "up"], ["no", "dn"])}
    config = SearchConfig(layer=LAYER, max_pairs=1, steps=1, top_k=2, candidates=2)
    result = run_search(
        tiny_lm, handwritten, pool, PROMPTS[:2], PROMPTS[2:], _words(tiny_lm), config, lengths=lengths,
        neutral=prepare_neutral(tiny_lm, ["plain words here.", "more of them"]), progress=False,
    )  # fmt: skip
    assert result.test["perplexity_unsteered"] > 1
    assert all(r["kl"] > 0 and r["perplexity"] > 1 for r in result.candidates)
    write_report(tmp_path, result)
    for name in ("report.md", "report.html", "lengths.png", "search.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "length vs strength" in (tmp_path / "report.md").read_text().lower()


def test_command_refuses_bad_input_before_loading_a_model(tmp_path):
    from steerlab.finetune.commands import PairSearchArgs, run_pair_search

    with pytest.raises(UserError, match="--top-k"):
        PairSearchArgs(out=tmp_path, top_k=0)
    with pytest.raises(UserError, match="--max-pairs"):
        PairSearchArgs(out=tmp_path, max_pairs=0)
    empty = tmp_path / "pool.json"
    empty.write_text(json.dumps({"positive": [], "negative": []}))
    with pytest.raises(UserError, match="pool.json.*no texts"):
        run_pair_search(PairSearchArgs(out=tmp_path, pool=str(empty)), lm=None)
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps({"-2": {"positive": ["a"], "negative": ["b"]}}))
    with pytest.raises(UserError, match="field '-2'"):
        run_pair_search(PairSearchArgs(out=tmp_path, lengths=str(lengths)), lm=None)
    with pytest.raises(UserError, match="--lengths"):
        run_pair_search(PairSearchArgs(out=tmp_path, lengths="builtin:sentiment"), lm=None)


def test_cli_refuses_bad_input_with_status_2(capsys):
    from steerlab.cli import main

    assert main(["pair-search", "--out", "x", "--top-k", "0"]) == 2
    assert "--top-k: must be at least 1" in capsys.readouterr().err
