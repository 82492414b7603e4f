"""Chat templating, BOS-safe encoding, and the token position at which A/B answers diverge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerlab.errors import UserError


def format_prompt(
    tokenizer: Any, user: str, system_prompt: str | None = None, assistant_prefix: str = ""
) -> str:
    """Render one user turn (and an optional system turn) ready for the assistant's reply, plus a prefix.

    With a chat template: `apply_chat_template(..., tokenize=False, add_generation_prompt=True)`; the system
    message is sent only when `system_prompt` is given (templates may insert their own default one, which then
    is part of the text). Without: "System: ...\\n\\nUser: ...\\n\\nAssistant:". `assistant_prefix` is
    appended verbatim.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        system = f"System: {system_prompt}\n\n" if system_prompt is not None else ""
        text = f"{system}User: {user}\n\nAssistant:"
    return text + assistant_prefix


def encode_continuation(tokenizer: Any, text: str, continuation: str) -> tuple[list[int], int]:
    """(ids of `text + continuation` encoded whole, so merges at the seam are respected; how many of them
    are `text`'s: where they leave `encode(text)`, at least 1). A `UserError` if `continuation` adds no
    token."""
    text_ids, ids = encode(tokenizer, text), encode(tokenizer, text + continuation)
    keep = 0
    while keep < min(len(text_ids), len(ids)) and ids[keep] == text_ids[keep]:
        keep += 1
    if keep >= len(ids):
        raise UserError(f"{continuation!r} adds no token after {text[-40:]!r}")
    return ids, max(keep, 1)


_SYSTEM_MARK = "SteerlabSystemMark"
_USER_MARK = "SteerlabUserMark"


def template_system_prompt(tokenizer: Any) -> str | None:
    """The system prompt the chat template inserts when none is given (None if it inserts none).

    Found by rendering one user turn with and without a marker system turn: the template's default is
    what stands where the marker stood.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = {"role": "user", "content": _USER_MARK}
    system = {"role": "system", "content": _SYSTEM_MARK}
    render = tokenizer.apply_chat_template
    try:
        plain = render([user], tokenize=False, add_generation_prompt=True)
        marked = render([system, user], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses system turns (jinja raises) inserts no default one
        return None
    if _SYSTEM_MARK not in marked:
        return None
    before, after = marked.split(_SYSTEM_MARK, 1)
    if len(plain) > len(before) + len(after) and plain.startswith(before) and plain.endswith(after):
        return plain[len(before) : len(plain) - len(after)]
    return None


def prompt_metadata(tokenizer: Any, system_prompt: str | None, chat: bool = True) -> dict[str, Any]:
    """How prompts were formatted, for a result's metadata.

    chat: whether texts were wrapped as a user turn (`format_prompt`); chat_template: whether the
    tokenizer's template rendered it (else the plain "User:/Assistant:" format); system_prompt: the
    text that ended up in the prompt; system_prompt_source: "given", "template default" (the template
    inserted its own) or None (no system prompt).
    """
    templated = chat and bool(getattr(tokenizer, "chat_template", None))
    text, origin = (system_prompt, "given") if system_prompt is not None else (None, None)
    if chat and system_prompt is None and templated:
        text = template_system_prompt(tokenizer)
        origin = "template default" if text is not None else None
    return {
        "chat": chat,
        "chat_template": templated,
        "system_prompt": text if chat else None,
        "system_prompt_source": origin if chat else None,
    }


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token in front of plain text by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with exactly one leading BOS when the tokenizer adds one by default.

    The text is tokenised without special-token insertion; BOS is prepended only if the tokenizer adds it
    by default and the text does not already begin with it (e.g. a rendered chat template starting with
    "<bos>"). Tokenizers that add no BOS (SmolLM2, GPT-2) get none.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids.insert(0, tokenizer.bos_token_id)
    return ids


def join_answer(prompt: str, answer: str) -> str:
    """`prompt` followed by the stripped answer: directly after whitespace (or an empty prompt), else after one space."""
    answer = answer.strip()
    if not prompt or prompt[-1].isspace():
        return prompt + answer
    return f"{prompt} {answer}"


@dataclass(frozen=True)
class AnswerLocation:
    """Where a set of answers to one prompt first differ, token-wise.

    `option_ids[i]` is the full encoding of prompt + answer i; `prefix_ids` the tokens all of them share;
    `answer_token_ids[i]` the first token of answer i after that shared prefix, at index `position`.
    """

    prefix_ids: list[int]
    option_ids: list[list[int]]
    answer_token_ids: list[int]
    position: int


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    length = min(len(s) for s in sequences)
    for k in range(length):
        if len({s[k] for s in sequences}) > 1:
            return k
    return length


def locate_answers(tokenizer: Any, prompt: str, answers: Sequence[str]) -> AnswerLocation:
    """Encode prompt + each answer in full and find the first token at which the answers differ.

    Encoding each text whole respects BPE merges across the prompt/answer boundary, so the "letter token"
    is whatever the tokenizer really produces ("A", "(A", " (A)", ...). Raises a `UserError` (naming the prompt
    end and the answers) when fewer than two answers are given, when the first differing tokens are not
    pairwise distinct, or when the prompt's own tokens (all but its last, which may merge with the answer)
    are not a prefix of every encoding.
    """
    where = f"prompt ending {prompt[-60:]!r} with answers {list(answers)!r}"
    if len(answers) < 2:
        raise UserError(f"locate_answers needs at least two answers: {where}")
    option_ids = [encode(tokenizer, join_answer(prompt, answer)) for answer in answers]
    prompt_ids = encode(tokenizer, prompt)
    stable = prompt_ids[: max(len(prompt_ids) - 1, 0)]
    for ids in option_ids:
        if ids[: len(stable)] != stable:
            raise UserError(
                f"the prompt's tokens are not a shared prefix of the prompt+answer encodings: {where}"
            )
    position = _common_prefix_length(option_ids)
    if any(len(ids) <= position for ids in option_ids):
        raise UserError(f"an answer adds no token after the shared prefix: {where}")
    answer_token_ids = [ids[position] for ids in option_ids]
    if len(set(answer_token_ids)) != len(answer_token_ids):
        tokens = tokenizer.convert_ids_to_tokens(answer_token_ids)
        raise UserError(f"the answers' first differing tokens {tokens} are not pairwise distinct: {where}")
    return AnswerLocation(option_ids[0][:position], option_ids, answer_token_ids, position)
