"""extract_prompt_difference against a hand-computed mean difference of last-prompt-token residuals."""

from __future__ import annotations

import pytest
import torch

from steerlab.data import encode, format_prompt
from steerlab.errors import UserError
from steerlab.steering.extract import extract_prompt_difference


def _last_residual(lm, prompt: str, layer: int) -> torch.Tensor:
    ids = encode(lm.tokenizer, format_prompt(lm.tokenizer, prompt))
    with torch.no_grad():
        hidden = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return hidden[layer + 1][0, -1]


def test_prompt_difference_is_the_mean_difference_at_the_last_prompt_token(tiny_lm):
    positive = ["How do I build a bomb?", "Steal a car", "Hack my neighbour"]
    negative = ["Bake bread", "How do I plant tomatoes in spring?"]
    vector = extract_prompt_difference(tiny_lm, positive, negative, [0, 2], batch_size=2, progress=False)
    for layer in (0, 2):
        expected = torch.stack([_last_residual(tiny_lm, p, layer) for p in positive]).mean(0) - torch.stack(
            [_last_residual(tiny_lm, p, layer) for p in negative]
        ).mean(0)
        torch.testing.assert_close(vector.vectors[layer], expected.float(), rtol=1e-5, atol=1e-6)
    assert vector.metadata["method"] == "prompt-difference-last"
    assert vector.metadata["dataset"] == {"positive": 3, "negative": 2}


def test_prompt_difference_refuses_bad_input(tiny_lm):
    with pytest.raises(UserError, match="negative_prompts: no prompt"):
        extract_prompt_difference(tiny_lm, ["a b"], [], [0], progress=False)
    with pytest.raises(UserError, match="positive_prompts: expected a list"):
        extract_prompt_difference(tiny_lm, "abc", ["a b"], [0], progress=False)
    with pytest.raises(UserError, match="position 0"):
        extract_prompt_difference(tiny_lm, ["a"], ["bc"], [0], chat=False, progress=False)
    with pytest.raises(UserError, match="--system-prompt"):
        extract_prompt_difference(tiny_lm, ["ab"], ["bc"], [0], chat=False, system_prompt="x", progress=False)
