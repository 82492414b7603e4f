"""Refusal judges: phrase matching, the refusal score against hand-computed log-probabilities, loaders."""

from __future__ import annotations

import pytest
import torch

from steerlab.data import encode, format_prompt
from steerlab.evaluate import (
    JudgeError,
    ModelJudge,
    PhraseJudge,
    is_refusal,
    load_judge,
    refusal_rate,
    refusal_score,
)


def test_is_refusal_on_hand_made_texts():
    refusals = [
        "I cannot help with that request.",
        "I\u2019m sorry, but I can\u2019t assist with making explosives.",
        "As an AI, I must decline.",
        "i won't write that.",
    ]
    answers = [
        "Sure, here is a recipe for chocolate cake: mix flour and sugar.",
        "To kill a hung Python process, run `kill -9 PID`.",
        "The capital of France is Paris.",
        "",
    ]
    assert all(is_refusal(t) for t in refusals)
    assert not any(is_refusal(t) for t in answers)
    assert refusal_rate(refusals + answers) == pytest.approx(0.5)
    assert refusal_rate([]) == 0.0


def test_phrase_judge_follows_the_protocol_and_checks_lengths():
    judge = load_judge("phrases")
    assert isinstance(judge, PhraseJudge)
    assert judge(["a", "b"], ["I'm sorry, no.", "Here you go."]) == [True, False]
    assert PhraseJudge(["nope"])(["a"], ["NOPE!"]) == [True]
    with pytest.raises(JudgeError, match="one generation per prompt"):
        judge(["a"], [])


def test_load_judge_names_the_argument_when_the_model_cannot_be_loaded(tmp_path):
    with pytest.raises(JudgeError, match=r"--judge: cannot load judge model"):
        load_judge(str(tmp_path / "missing.gguf"))
    with pytest.raises(JudgeError, match=r"--grader: cannot load judge model 'smollm2-135n'"):
        load_judge("smollm2-135n", option="--grader")
    with pytest.raises(JudgeError, match="--judge: empty"):
        load_judge(" ")


def _sequence_logprob(lm, ids: list[int], first: int) -> float:
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return float(sum(logits[t - 1, ids[t]] for t in range(first, len(ids))))


def test_refusal_score_matches_hand_computed_log_probabilities(tiny_lm):
    prompts = ["How do I bake bread?", "Tell me a secret plan"]
    refuse, comply = ["No way", "I can't"], ["Sure"]
    got = refusal_score(tiny_lm, prompts, refusal_starts=refuse, compliance_starts=comply, batch_size=3)
    for prompt, score in zip(prompts, got, strict=True):
        text = format_prompt(tiny_lm.tokenizer, prompt)
        n = len(encode(tiny_lm.tokenizer, text))
        r = [_sequence_logprob(tiny_lm, encode(tiny_lm.tokenizer, text + s), n) for s in refuse]
        c = [_sequence_logprob(tiny_lm, encode(tiny_lm.tokenizer, text + s), n) for s in comply]
        expected = torch.tensor(r, dtype=torch.float64).logsumexp(0) - torch.tensor(
            c, dtype=torch.float64
        ).logsumexp(0)
        assert score == pytest.approx(float(expected), abs=1e-9)
    with pytest.raises(JudgeError, match="at least one refusal start"):
        refusal_score(tiny_lm, prompts, refusal_starts=[])


def test_model_judge_compares_yes_and_no(tiny_lm):
    judge = ModelJudge(tiny_lm)
    scores = judge.scores(["q1", "q2"], ["I'm sorry", "Sure"])
    question = judge.question.format(prompt="q2", generation="Sure")
    ids = encode(tiny_lm.tokenizer, format_prompt(tiny_lm.tokenizer, question))
    with torch.no_grad():
        last = tiny_lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
    space = tiny_lm.tokenizer(" ", add_special_tokens=False).input_ids[0]
    assert space not in judge.yes and space not in judge.no
    expected = last[judge.yes].logsumexp(-1) - last[judge.no].logsumexp(-1)
    assert scores[1] == pytest.approx(float(expected), abs=1e-6)
    assert judge(["q1", "q2"], ["I'm sorry", "Sure"]) == [s > 0 for s in scores]
    assert judge([], []) == []
