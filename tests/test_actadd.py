"""ActAdd: extraction against a hand computation, the per-position hook, padding, caching, gradients,
files and bad inputs."""

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.errors import UserError
from steerlab.hooks import add_block, capture_residual
from steerlab.io import ResultFileError
from steerlab.models import wrap
from steerlab.steering import ActAddVector, extract_actadd, generate_actadd
from steerlab.steering.actadd import pair_ids
from steerlab.steering.vector import InvalidVectorError, VectorError

LAYER = 1


def _block(n: int = 3, seed: int = 0, width: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g, dtype=torch.float64)


def _lm(attn: str = "eager"):
    return wrap(tiny_model("llama", attn=attn), char_tokenizer(), name="tiny-llama")


def test_extraction_equals_per_position_differences_by_hand():
    lm = _lm()
    vector = extract_actadd(lm, "ab", "wxyz", layer=LAYER)
    tok = lm.tokenizer
    sink, pad = tok.bos_token_id, tok.convert_tokens_to_ids(" ")
    pos = [sink, *tok.convert_tokens_to_ids(list("ab")), pad, pad]  # right-padded with the space token
    neg = [sink, *tok.convert_tokens_to_ids(list("wxyz"))]
    hand = []
    for ids in (pos, neg):
        out = lm.model(torch.tensor([ids]), output_hidden_states=True)
        hand.append(out.hidden_states[LAYER + 1][0])  # the output of block LAYER
    expected = (hand[0] - hand[1])[1:]  # the sink (position 0) is not part of the vector
    assert vector.block.shape == (4, 32) and vector.layer == LAYER
    torch.testing.assert_close(vector.block, expected.float(), rtol=1e-6, atol=1e-6)
    assert float((hand[0] - hand[1])[0].abs().max()) == 0.0  # same sink token: no difference there
    meta = vector.metadata
    assert meta["positive_tokens"] == ["<s>", "a", "b", " ", " "] and meta["negative_tokens"][0] == "<s>"
    assert meta["pad"] == {"text": " ", "id": pad} and meta["sink"] == {"token": "<s>", "id": sink}
    assert pair_ids(tok, "ab", "wxyz")[:2] == (pos, neg)


def test_negative_layer_and_other_pad_token():
    lm = _lm()
    a = extract_actadd(lm, "ab", "c", layer=-3, pad="_")
    assert a.layer == 1 and a.metadata["negative_tokens"] == ["<s>", "c", "_"]


def test_hook_adds_the_block_exactly_at_positions_1_to_n():
    model = tiny_model("llama")
    block = _block(3)
    ids = torch.randint(3, 100, (1, 7))
    with capture_residual(model, [LAYER]) as base:
        model(ids)
    plain = base[LAYER].clone()
    with add_block(model, {LAYER: 2.0 * block}), capture_residual(model, [LAYER]) as steered:
        model(ids)
    delta = steered[LAYER] - plain
    hit = [t for t in range(7) if delta[0, t].abs().max() > 0]
    assert hit == [1, 2, 3]
    torch.testing.assert_close(delta[0, 1:4], 2.0 * block, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_equal_single_prompts(side):
    model = tiny_model("llama", attn="sdpa")
    block = _block(3, seed=1)
    rows = [torch.randint(3, 100, (n,)) for n in (5, 9, 4)]
    width = 9
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, seq in enumerate(rows):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[r, span], mask[r, span] = seq, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with add_block(model, {LAYER: block}):
        batched = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for r, seq in enumerate(rows):
        with add_block(model, {LAYER: block}):
            alone = model(seq[None]).logits[0]
        plain = model(seq[None]).logits[0]
        torch.testing.assert_close(batched[r][mask[r].bool()], alone, rtol=1e-9, atol=1e-9)
        assert (alone - plain).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_cached_and_uncached_generation_agree_and_decode_steps_are_untouched(family):
    model = tiny_model(family, attn="sdpa")
    block = _block(4, seed=2) * 4.0
    ids = torch.randint(3, 100, (2, 8))
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0: 5 real tokens, left-padded
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    outs = {}
    for cache in (True, False):
        with add_block(model, {LAYER: block}):
            outs[cache] = model.generate(ids, use_cache=cache, **kwargs)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    cached, uncached = torch.stack(outs[True].logits), torch.stack(outs[False].logits)
    torch.testing.assert_close(cached, uncached, rtol=1e-8, atol=1e-8)
    plain = torch.stack(model.generate(ids, use_cache=True, **kwargs).logits)
    assert (plain - cached).abs().max() > 1e-3
    # The whole steered sequence as one prompt: only positions 1..4 receive the block, so the logits at
    # the generated positions are those of generation (nothing was added at decode steps).
    full = outs[True].sequences
    full_mask = torch.cat([mask, torch.ones(2, full.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    with add_block(model, {LAYER: block}):
        logits = model(
            full, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    again = logits[:, ids.shape[1] - 1 : -1].transpose(0, 1)
    torch.testing.assert_close(again.to(cached.dtype), cached, rtol=1e-5, atol=1e-5)


def test_decode_steps_cost_nothing():
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 6))

    def counts(new_tokens, steered):
        def run():
            model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if steered:
                with add_block(model, {LAYER: _block(2)}):
                    run()
            else:
                run()
        out: dict[str, int] = {}
        for event in prof.events():
            out[event.name] = out.get(event.name, 0) + 1
        return out

    def extra(new_tokens):
        plain, steered = counts(new_tokens, False), counts(new_tokens, True)
        return {k: steered.get(k, 0) - plain.get(k, 0) for k in set(plain) | set(steered)}

    short, long = extra(3), extra(13)
    assert {k: long[k] - short.get(k, 0) for k in long if long[k] != short.get(k, 0)} == {}


def _exact_lm():
    """A tiny Llama computing every step in float64 (sdpa attention, torch's RMSNorm in place of Hugging
    Face's, which normalises in float32), so central finite differences are exact to ~1e-10."""
    model = tiny_model("llama", attn="sdpa").requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                norm = torch.nn.RMSNorm(32, eps=child.variance_epsilon, dtype=torch.float64)
                norm.weight.data.copy_(child.weight.data)
                setattr(parent, name, norm.requires_grad_(False))
    return wrap(model, char_tokenizer(), name="tiny-llama")


def test_gradients_reach_coefficient_and_block_as_finite_differences():
    lm = _exact_lm()
    vector = extract_actadd(lm, "ab", "c", layer=LAYER)
    block = vector.block.double().requires_grad_(True)
    ids = torch.tensor([[1, *lm.tokenizer.convert_tokens_to_ids(list("hello"))]])

    def loss(coefficient, b):
        with add_block(lm.model, {LAYER: coefficient * b}):
            return lm.model(ids).logits[0, -1].log_softmax(-1)[7]

    c = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    loss(c, block).backward()
    eps = 1e-6
    with torch.no_grad():
        fd = (loss(c + eps, block) - loss(c - eps, block)) / (2 * eps)
        assert abs(float(c.grad) - float(fd)) < 1e-8
        for row, col in [(0, 3), (1, 17)]:
            bump = torch.zeros_like(block)
            bump[row, col] = eps
            fd = (loss(c, block + bump) - loss(c, block - bump)) / (2 * eps)
            assert abs(float(block.grad[row, col]) - float(fd)) < 1e-8
    assert float(block.grad.abs().sum()) > 0
    # through the vector's own apply, with a tensor coefficient
    c2 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    with vector.apply(lm, c2):
        lm.model(ids).logits[0, -1, 7].backward()
    assert c2.grad is not None and float(c2.grad) != 0


def test_generate_actadd_batches_like_single_prompts_and_steers():
    lm = _lm(attn="sdpa")
    vector = extract_actadd(lm, "ab", "c", layer=LAYER)
    prompts = ["hello there", "hi", "a longer prompt here"]
    batched = generate_actadd(lm, prompts, vector, 8.0, max_new_tokens=8, batch_size=3)
    alone = [generate_actadd(lm, [p], vector, 8.0, max_new_tokens=8)[0] for p in prompts]
    uncached = generate_actadd(lm, prompts, vector, 8.0, max_new_tokens=8, batch_size=3, use_cache=False)
    assert batched == alone == uncached
    assert generate_actadd(lm, prompts, None, max_new_tokens=8) != batched


def test_short_prompt_errors_or_truncates():
    lm = _lm()
    vector = extract_actadd(lm, "abcd", "c", layer=LAYER)  # 4 positions
    with pytest.raises(UserError, match=r"prompt 2 'hi' has 2 tokens .* covers 4 positions"):
        generate_actadd(lm, ["hello", "hi"], vector, 1.0, max_new_tokens=2)
    with pytest.raises(UserError, match="shorter than the 4 positions"), vector.apply(lm, 1.0):
        lm.model(torch.tensor([[1, 40, 41]]))
    # truncate: the rows that fit (positions 1..2 of a 3-token prompt), nothing else
    ids = torch.tensor([[1, 40, 41]])
    with capture_residual(lm.model, [LAYER]) as base:
        lm.model(ids)
    plain = base[LAYER].clone()
    with vector.apply(lm, 1.0, truncate=True), capture_residual(lm.model, [LAYER]) as steered:
        lm.model(ids)
    delta = (steered[LAYER] - plain)[0]
    torch.testing.assert_close(delta[1:3], vector.block[:2].double(), rtol=1e-6, atol=1e-6)
    assert float(delta[0].abs().max()) == 0.0
    assert len(generate_actadd(lm, ["hi"], vector, 1.0, max_new_tokens=2, truncate=True)) == 1


def test_bad_inputs_name_the_argument():
    lm = _lm()
    with pytest.raises(UserError, match="positive '': encodes to no token"):
        extract_actadd(lm, "", " ", layer=LAYER)
    with pytest.raises(UserError, match="negative '': encodes to no token"):
        extract_actadd(lm, "ab", "", layer=LAYER)
    with pytest.raises(UserError, match="pad 'ab': encodes to 2 tokens"):
        extract_actadd(lm, "ab", "c", layer=LAYER, pad="ab")
    with pytest.raises(UserError, match="--layer 9: the model has 4 layers"):
        extract_actadd(lm, "ab", "c", layer=9)
    with pytest.raises(UserError, match="are the same tokens once padded"):
        extract_actadd(lm, "ab", "ab ", layer=LAYER)
    with pytest.raises(UserError, match="sink 'nope'"):
        extract_actadd(lm, "ab", "c", layer=LAYER, sink="nope")
    vector = extract_actadd(lm, "ab", "c", layer=LAYER)
    with pytest.raises(VectorError, match="coefficient inf"):
        vector.apply(lm, float("inf"))
    with pytest.raises(UserError, match="prompt 1 '': encodes to no token"):
        generate_actadd(lm, [""], vector)
    with pytest.raises(InvalidVectorError, match="all zeros"):
        ActAddVector(1, torch.zeros(2, 32))
    with pytest.raises(InvalidVectorError, match="expected \\(positions, width\\)"):
        ActAddVector(1, torch.ones(32))
    with pytest.raises(UserError, match=r"shape \(2, 8\); expected \(positions, 32\)"):
        add_block(lm.model, {LAYER: torch.ones(2, 8)}).__enter__()
    wide = wrap(tiny_model("gpt2"), char_tokenizer())
    with pytest.raises(InvalidVectorError, match="width 32"):
        ActAddVector(1, torch.ones(2, 16)).apply(wide)


def test_save_load_and_derived_vectors(tmp_path):
    lm = _lm()
    vector = extract_actadd(lm, "abc", "d", layer=LAYER)
    vector.save(tmp_path / "v")
    back = ActAddVector.load(tmp_path / "v")
    assert back.layer == LAYER and torch.equal(back.block, vector.block)
    assert back.metadata["positive"] == "abc" and back.metadata["positions"] == 3
    with pytest.raises(ResultFileError, match="not a steerlab.ActAddVector"):
        from steerlab.steering import SteeringVector

        SteeringVector({1: torch.ones(32)}).save(tmp_path / "s")
        ActAddVector.load(tmp_path / "s")
    control = vector.random_like(seed=3)
    torch.testing.assert_close(
        torch.tensor(control.position_norms()), torch.tensor(vector.position_norms()), rtol=1e-6, atol=0
    )
    assert abs(float(torch.nn.functional.cosine_similarity(control.block, vector.block).mean())) < 0.6
    kept = vector.keep_dimensions([0, 5, 31])
    assert kept.block[:, [1, 2, 30]].abs().sum() == 0 and torch.equal(kept.block[:, 5], vector.block[:, 5])
    assert torch.equal(vector.keep_dimensions(torch.arange(32) < 8).block[:, 8:], torch.zeros(3, 24))
    scaled = vector.rescaled(kept.norm())
    assert abs(scaled.norm() - kept.norm()) < 1e-4 and scaled.metadata["derived"][-1]["method"] == "rescaled"
    assert scaled.metadata["position_norms"] == pytest.approx(scaled.position_norms())
    with pytest.raises(VectorError, match="0..31"):
        vector.keep_dimensions([32])


def test_one_block_per_row_equals_each_row_alone():
    model = tiny_model("llama", attn="sdpa")
    blocks = torch.stack([_block(2, seed=5), torch.zeros(2, 32, dtype=torch.float64), _block(2, seed=6)])
    ids = torch.randint(3, 100, (3, 6))
    with add_block(model, {LAYER: blocks}):
        batched = model(ids).logits
    for row in range(3):
        with add_block(model, {LAYER: blocks[row]}):
            alone = model(ids[row : row + 1]).logits[0]
        torch.testing.assert_close(batched[row], alone, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(batched[1], model(ids[1:2]).logits[0], rtol=1e-9, atol=1e-9)
    with pytest.raises(UserError, match="3 rows for a batch of 2"), add_block(model, {LAYER: blocks}):
        model(ids[:2])
