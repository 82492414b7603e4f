import pytest
import torch

from conftest import tiny_model
from steerlab.hooks import Positions, capture_residual, run_to_layers, steer
from steerlab.models import block

LAYER = 1


def _unit(seed: int = 0, width: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(width, generator=g, dtype=torch.float64)


def _hook_count(model) -> int:
    return len(model._forward_pre_hooks) + sum(len(b._forward_hooks) for b in model.model.layers)


def test_steer_adds_exactly_at_selected_positions():
    model = tiny_model("llama")
    v = _unit()
    ids = torch.randint(3, 100, (1, 7))
    with capture_residual(model, [LAYER]) as base:
        model(ids)
    plain = base[LAYER].clone()
    for spec, expected in [
        (Positions.all(), [1, 2, 3, 4, 5, 6]),
        (Positions.all(include_sink=True), [0, 1, 2, 3, 4, 5, 6]),
        (Positions.from_position(4), [4, 5, 6]),
        (Positions.from_position(-2), [5, 6]),
        (Positions.at(2, 5), [2, 5]),
        (Positions.decode_only(), []),
    ]:
        with steer(model, {LAYER: v}, 3.0, spec), capture_residual(model, [LAYER]) as steered:
            model(ids)
        delta = steered[LAYER] - plain
        hit = [t for t in range(7) if delta[0, t].abs().max() > 0]
        assert hit == expected, spec
        for t in expected:
            torch.testing.assert_close(delta[0, t], 3.0 * v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_per_row(side):
    """Each row of a padded batch is steered exactly as it would be alone."""
    model = tiny_model("llama", attn="sdpa")
    v = _unit(1)
    rows = [torch.randint(3, 100, (n,)) for n in (5, 9, 7)]
    width = 9
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, seq in enumerate(rows):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[r, span], mask[r, span] = seq, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    spec = Positions.from_position(-3)
    with steer(model, {LAYER: v}, 2.0, spec):
        batched = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for r, seq in enumerate(rows):
        with steer(model, {LAYER: v}, 2.0, spec):
            alone = model(seq[None]).logits[0]
        real = mask[r].bool()
        torch.testing.assert_close(batched[r][real], alone, rtol=1e-9, atol=1e-9)


def test_per_row_start_positions():
    model = tiny_model("llama")
    v = _unit(2)
    ids = torch.randint(3, 100, (2, 6))
    with capture_residual(model, [LAYER]) as base:
        model(ids)
    plain = base[LAYER].clone()
    with (
        steer(model, {LAYER: v}, 1.0, Positions.from_position([2, 4])),
        capture_residual(model, [LAYER]) as s,
    ):
        model(ids)
    changed = (s[LAYER] - plain).abs().amax(-1) > 0
    assert changed.tolist() == [
        [False, False, True, True, True, True],
        [False, False, False, False, True, True],
    ]


SPECS = [Positions.all(), Positions.from_position(-1), Positions.decode_only(), Positions.at(3, 12, 20)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2", "gemma"])
@pytest.mark.parametrize("spec", SPECS, ids=["all", "from-1", "decode", "at"])
def test_cached_and_uncached_generation_agree(family, spec):
    model = tiny_model(family, attn="sdpa")
    v = _unit(3) * 4.0
    ids = torch.randint(3, 100, (2, 8))
    ids[0, :3] = 0  # left padding in row 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=24,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    outs = {}
    for cache in (True, False):
        with steer(model, {LAYER: v, 2: -v}, 1.0, spec):
            outs[cache] = model.generate(ids, use_cache=cache, **kwargs)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    cached, uncached = torch.stack(outs[True].logits), torch.stack(outs[False].logits)
    torch.testing.assert_close(cached, uncached, rtol=1e-8, atol=1e-8)
    plain = torch.stack(model.generate(ids, use_cache=True, **kwargs).logits)
    assert (plain - cached).abs().max() > 1e-3  # the vector does change what the model predicts


def test_hooks_removed_after_exception():
    model = tiny_model("llama")
    before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, {0: _unit(), 2: _unit()}, 1.0):
            assert _hook_count(model) == before + 3
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with capture_residual(model, [1, 3]):
            raise RuntimeError("boom")
    assert _hook_count(model) == before


def test_run_to_layers_stops_early():
    model = tiny_model("llama")
    seen = []
    late_calls = []
    handle = block(model, 3).register_forward_hook(lambda *a: late_calls.append(1))
    try:
        run_to_layers(
            model, [0, 1], lambda layer, h: seen.append(layer), input_ids=torch.randint(3, 100, (1, 5))
        )
    finally:
        handle.remove()
    assert seen == [0, 1] and late_calls == []


def _op_counts(model, fn) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def test_decode_steps_add_one_op_and_copy_nothing():
    """Under KV-cache decoding the hook costs one add per steered layer per step: no copies, no masks."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)

    def run(new_tokens):
        return lambda: model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )

    def steered_extra(new_tokens):
        plain = _op_counts(model, run(new_tokens))
        with steer(model, {1: _unit(), 2: _unit(1)}, 1.0):
            steered = _op_counts(model, run(new_tokens))
        return {k: steered.get(k, 0) - plain.get(k, 0) for k in set(plain) | set(steered)}

    short, long = steered_extra(4), steered_extra(14)
    per_ten_steps = {k: long[k] - short.get(k, 0) for k in long if long[k] - short.get(k, 0) != 0}
    assert per_ten_steps == {"aten::add": 20}, per_ten_steps


def test_start_at_block_equals_full_forward_and_restores_blocks_on_error():
    from steerlab.hooks import record_block_input, start_at_block
    from steerlab.models import decoder_layers

    model = tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    blocks = list(decoder_layers(model))
    with torch.no_grad(), record_block_input(model, 1) as seen:
        full = model(input_ids=ids).logits
    with torch.no_grad(), start_at_block(model, 1, seen[0]):
        assert not any(a is b for a, b in zip(decoder_layers(model), blocks[:1]))  # block 0 skipped
        assert torch.allclose(model(input_ids=ids).logits, full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="do not fit"), start_at_block(model, 1, seen[0][:1]):
        model(input_ids=ids)
    assert list(decoder_layers(model)) == blocks


def test_positions_parse_and_refuse_bad_specs():
    from steerlab.errors import UserError

    assert Positions.parse(" From:-2 ") == Positions.from_position(-2)
    assert Positions.parse("at:3,5") == Positions.at(3, 5)
    assert Positions.parse("decode") == Positions.decode_only()
    for text, message in [
        ("first", r"--positions 'first': use 'all', 'decode', 'from:K' or 'at:I,J'"),
        ("from:x", r"--positions 'from:x': K, I and J must be integers"),
        ("at:", r"--positions 'at:': K, I and J must be integers"),
        ("at:-1", r"--positions 'at:-1': positions 'at' needs real-token indices >= 0, got \[-1\]"),
    ]:
        with pytest.raises(UserError, match=f"^{message}$"):
            Positions.parse(text)
