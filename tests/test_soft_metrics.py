"""Soft metrics: BERTScore against the bert-score package and a hand computation, sentence embeddings against
a manual mean-pool, keyword counts, passage perplexity, and encoder loading errors."""

from __future__ import annotations

import math

import pytest
import torch

from steerlab.data import encode
from steerlab.errors import UserError
from steerlab.evaluate.soft import (
    BERTScore,
    bert_score,
    embedding_similarity,
    idf_weights,
    keyword_counts,
    passage_perplexity,
    sentence_embeddings,
    similarity_matrix,
)
from steerlab.evaluate.soft.perplexity import windows
from steerlab.hooks import steer
from steerlab.models.encoders import EncoderNotFoundError, get_encoder, load_encoder

CANDIDATES = [
    "The cat sat on the mat.",
    "hello world",
    "  Weddings are joyful celebrations of love.  ",
    "A much longer candidate sentence, with punctuation and numbers like 42!",
]
REFERENCES = [
    "A cat was sitting on a mat.",
    "goodbye world",
    "Shipping containers move goods across the ocean.",
    "Another reference sentence that shares a few words with the candidate.",
]


@pytest.fixture(scope="module")
def encoder():
    try:
        return get_encoder()
    except EncoderNotFoundError as error:
        pytest.skip(f"the embedded encoder is not installed: {error}")


@pytest.fixture(scope="module")
def reference_bert_score():
    return pytest.importorskip("bert_score", reason="the bert-score package (0.3.13) is not installed")


@pytest.mark.parametrize(("layer", "idf"), [(6, False), (6, True), (3, False)])
def test_bertscore_equals_the_bert_score_package(encoder, reference_bert_score, layer, idf):
    ours = bert_score(CANDIDATES, REFERENCES, encoder, layer=layer, idf=idf)
    P, R, F = reference_bert_score.score(
        CANDIDATES, REFERENCES, model_type=encoder.source, num_layers=layer, idf=idf, nthreads=0
    )
    for mine, theirs in ((ours.precision, P), (ours.recall, R), (ours.f1, F)):
        torch.testing.assert_close(mine, theirs.double(), atol=1e-5, rtol=0)
    assert ours.layer == layer and ours.idf == idf


def test_bertscore_matches_real_tokens_only_where_bert_score_batches_with_zero_padding(
    encoder, reference_bert_score
):
    # these short, unrelated texts have tokens whose best cosine is negative; in a padded batch bert-score
    # reads the padding's similarity 0 as their best match, so only its one-pair batches agree with ours
    cands = ["Barack Obama was born in", "I went up to my friend and said something long and winding today"]
    refs = ["Shrek starts off in a swamp", "Another reference"]
    ours = bert_score(cands, refs, encoder, layer=6)
    common = dict(model_type=encoder.source, num_layers=6, nthreads=0)
    single = reference_bert_score.score(cands, refs, batch_size=1, **common)
    batched = reference_bert_score.score(cands, refs, batch_size=64, **common)
    for mine, theirs in zip((ours.precision, ours.recall, ours.f1), single):
        torch.testing.assert_close(mine, theirs.double(), atol=1e-5, rtol=0)
    gaps = [
        (mine[0] - theirs[0].double()).abs() for mine, theirs in zip((ours.precision, ours.recall), batched)
    ]
    assert max(gaps) > 1e-3
    _, c = _states(encoder, cands[0], 6)
    _, r = _states(encoder, refs[0], 6)
    best = torch.nn.functional.normalize(c, dim=-1) @ torch.nn.functional.normalize(r, dim=-1).T
    assert (best.max(dim=1).values < 0).any() or (best.max(dim=0).values < 0).any()


def test_bertscore_baseline_and_several_references_equal_the_package(encoder, reference_bert_score, tmp_path):
    baseline = tmp_path / "baseline.tsv"
    rows = [f"{k},{0.3 + 0.01 * k},{0.35 + 0.01 * k},{0.32 + 0.01 * k}" for k in range(7)]
    baseline.write_text("LAYER,P,R,F\n" + "\n".join(rows) + "\n")
    refs = [[r, "an unrelated second reference"] for r in REFERENCES]
    ours = bert_score(CANDIDATES, refs, encoder, layer=5, baseline=baseline)
    P, R, F = reference_bert_score.score(
        CANDIDATES,
        refs,
        model_type=encoder.source,
        num_layers=5,
        nthreads=0,
        rescale_with_baseline=True,
        lang="en",
        baseline_path=str(baseline),
    )
    for mine, theirs in ((ours.precision, P), (ours.recall, R), (ours.f1, F)):
        torch.testing.assert_close(mine, theirs.double(), atol=1e-5, rtol=0)
    assert ours.baseline == pytest.approx((0.35, 0.40, 0.37))


def _states(encoder, text: str, layer: int) -> tuple[list[int], torch.Tensor]:
    enc = encoder.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = encoder.model(**enc, output_hidden_states=True)
    return enc["input_ids"][0].tolist(), out.hidden_states[layer][0]


def test_bertscore_by_hand(encoder):
    cand, ref = "the quick fox", "a fast brown fox"
    layer = 4
    c_ids, c = _states(encoder, cand, layer)
    r_ids, r = _states(encoder, ref, layer)
    special = {encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id}

    def cos(u, v):
        return float(u @ v / (u.norm() * v.norm()))

    def greedy(xs, x_ids, ys, idf=None):
        weights = [0.0 if t in special else (idf[t] if idf else 1.0) for t in x_ids]
        best = [max(cos(x, y) for y in ys) for x in xs]  # every token of the other text is a partner
        return sum(w * b for w, b in zip(weights, best)) / sum(weights)

    p, rec = greedy(c, c_ids, r), greedy(r, r_ids, c)
    score = bert_score([cand], [ref], encoder, layer=layer)
    assert score.precision.item() == pytest.approx(p, abs=1e-6)
    assert score.recall.item() == pytest.approx(rec, abs=1e-6)
    assert score.f1.item() == pytest.approx(2 * p * rec / (p + rec), abs=1e-6)

    refs = [ref, "the slow dog", "fox"]
    idf = idf_weights(refs, encoder)
    assert idf[encoder.tokenizer.cls_token_id] == 0.0  # in every reference
    fox = encoder.tokenizer.convert_tokens_to_ids("fox")
    assert idf[fox] == pytest.approx(math.log(4 / 3))
    assert idf[encoder.tokenizer.convert_tokens_to_ids("zebra")] == pytest.approx(math.log(4))
    scored = bert_score([cand] * 3, refs, encoder, layer=layer, idf=True)
    assert scored.precision[0].item() == pytest.approx(greedy(c, c_ids, r, idf), abs=1e-6)
    assert scored.recall[0].item() == pytest.approx(greedy(r, r_ids, c, idf), abs=1e-6)


def test_bertscore_identity_empty_texts_ci_and_save(encoder, tmp_path):
    score = bert_score(["same text here", "", "x"], ["same text here", "abc", "   "], encoder)
    assert score.f1[0].item() == pytest.approx(1.0, abs=1e-6)
    assert score.f1[1:].tolist() == [0.0, 0.0]  # an empty candidate or reference scores 0
    mean, low, high = score.ci("f1", n_boot=200)
    assert low <= mean <= high
    assert score.summary(n_boot=50)["n"] == 3
    score.save(tmp_path / "bs")
    again = BERTScore.load(tmp_path / "bs")
    assert torch.equal(again.f1, score.f1) and again.layer == score.layer == 6
    with pytest.raises(UserError, match="2 candidates but 1 references"):
        bert_score(["a", "b"], ["a"], encoder)
    with pytest.raises(UserError, match="--layer"):
        bert_score(["a"], ["a"], encoder, layer=7)


def test_sentence_embeddings_equal_a_manual_mean_pool(encoder):
    texts = ["A short one.", "A somewhat longer sentence about weddings and cakes.", "  padded  "]
    emb = sentence_embeddings(texts, encoder, batch_size=2)
    enc = encoder.tokenizer(
        [t.strip() for t in texts], padding=True, truncation=True, max_length=256, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = encoder.model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    manual = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    torch.testing.assert_close(emb, manual, atol=1e-5, rtol=0)
    assert encoder.max_length == 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2

    same = embedding_similarity(texts, texts, encoder)
    torch.testing.assert_close(same, torch.ones(3), atol=1e-5, rtol=0)
    matrix = similarity_matrix(texts, encoder=encoder)
    torch.testing.assert_close(matrix, emb @ emb.T, atol=1e-5, rtol=0)
    related = embedding_similarity(["a cat sat on the mat"], ["a kitten sat on the rug"], encoder)
    unrelated = embedding_similarity(["a cat sat on the mat"], ["quarterly tax filing deadlines"], encoder)
    assert related.item() > unrelated.item()
    with pytest.raises(UserError, match="one string"):
        sentence_embeddings("not a list", encoder)


def test_encoder_not_found_names_the_argument(tmp_path):
    with pytest.raises(EncoderNotFoundError, match=r"--encoder: './no-such-encoder' is no embedded encoder"):
        load_encoder("./no-such-encoder")
    with pytest.raises(EncoderNotFoundError, match="did you mean 'all-minilm-l6-v2'"):
        load_encoder("all-minilm-l6-v3")
    with pytest.raises(EncoderNotFoundError, match="without config.json"):
        load_encoder(tmp_path)
    with pytest.raises(EncoderNotFoundError, match="--bert-encoder: 'not a hub id!'"):
        load_encoder("not a hub id!", option="--bert-encoder")


def test_keyword_counts_whole_words_case_insensitive():
    texts = [
        "Wedding bells! The WEDDING was lovely; weddings are fun. Wed-ding is two words.",
        "The wedding-cake and a wedding day",
        "",
    ]
    counts = keyword_counts(texts, ["wedding", "weddings", "wedding day", "wed"])
    assert counts.per_keyword.tolist() == [[2, 1, 0, 1], [2, 0, 1, 0], [0, 0, 0, 0]]
    assert counts.counts.tolist() == [4, 3, 0]
    # hyphens separate words: "Wedding bells The WEDDING was lovely weddings are fun Wed ding is two words"
    assert counts.n_words.tolist() == [14, 7, 0]
    expected = torch.tensor([400 / 14, 300 / 7, 0.0], dtype=torch.float64)
    torch.testing.assert_close(counts.per_100_words, expected)
    with pytest.raises(UserError, match="keywords"):
        keyword_counts(texts, [])
    with pytest.raises(UserError, match=r"keywords\[1\]"):
        keyword_counts(texts, ["a", " "])


def test_windows_score_every_token_once():
    for n, context, stride in [(20, 8, 7), (20, 8, 3), (5, 8, 7), (9, 2, 1)]:
        spans = windows(n, context, stride)
        targets = [t for _, end, first in spans for t in range(first, end)]
        assert targets == list(range(1, n))
        assert all(end - start <= context and first > start for start, end, first in spans)


def test_passage_perplexity_equals_exp_mean_nll(tiny_lm):
    text = "The wedding was held in the garden; everybody danced until midnight."
    ids = torch.tensor([encode(tiny_lm.tokenizer, text)])
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=ids).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:], reduction="none")
    whole = passage_perplexity(tiny_lm, text, context_length=256)
    assert whole.n_tokens == ids.shape[1] - 1
    torch.testing.assert_close(whole.token_nll, nll, atol=1e-6, rtol=0)
    assert whole.perplexity == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)

    # windows of 16 tokens, 10 apart: token t is predicted from the window that first scores it
    chunked = passage_perplexity(tiny_lm, text, context_length=16, stride=10, batch_size=3)
    expected = []
    for start, end, first in windows(ids.shape[1], 16, 10):
        with torch.no_grad():
            part = tiny_lm.model(input_ids=ids[:, start:end]).logits[0].double().log_softmax(-1)
        expected += [-part[t - 1 - start, ids[0, t]].item() for t in range(first, end)]
    torch.testing.assert_close(
        chunked.token_nll, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert chunked.perplexity == pytest.approx(math.exp(sum(expected) / len(expected)), rel=1e-6)

    with steer(tiny_lm.model, {1: torch.ones(32, dtype=torch.float64)}):
        steered = passage_perplexity(tiny_lm, text, context_length=256)
    assert steered.perplexity != pytest.approx(whole.perplexity)  # the hooks in place are used
    with pytest.raises(UserError, match="--stride"):
        passage_perplexity(tiny_lm, text, context_length=16, stride=16)
