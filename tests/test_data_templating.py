"""Chat templating, BOS handling and answer-token location on synthetic and real tokenizers."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from conftest import char_tokenizer
from steerlab.data import adds_bos, encode, format_prompt, join_answer, locate_answers
from steerlab.data.templating import prompt_metadata, template_system_prompt
from steerlab.errors import UserError

LETTERS = "ABCDEFGH"
TWO = ["(A)", "(B)"]
EIGHT = [f"({c})" for c in LETTERS]


def paren_letter_tokenizer():
    """SentencePiece-like (Metaspace "▁"), characters plus merged "(A".."(H"; adds <s> by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set(" \x0b\x0c")) + ["▁"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars, *(f"({c}" for c in LETTERS)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("(", c) for c in LETTERS], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def space_paren_letter_tokenizer():
    """GPT-2-like byte-level BPE whose merges build " (A)" .. " (H)" into single tokens; no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merged = ["Ġ(", *(f"Ġ({c}" for c in LETTERS), *(f"Ġ({c})" for c in LETTERS)]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", *alphabet, *merged])}
    merges = [("Ġ", "("), *(("Ġ(", c) for c in LETTERS), *((f"Ġ({c}", ")") for c in LETTERS)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(list(ids))


# --- join_answer / format_prompt ---------------------------------------------------------------------------


def test_join_answer():
    assert join_answer("Answer:", " (A)") == "Answer: (A)"
    assert join_answer("Answer:", "(A)") == "Answer: (A)"
    assert join_answer("assistant\n", " (B) ") == "assistant\n(B)"
    assert join_answer("Answer: ", "(C)") == "Answer: (C)"
    assert join_answer("", " (A)") == "(A)"


def test_format_prompt_with_template():
    tok = char_tokenizer()
    assert format_prompt(tok, "hi") == "<s>user: hi\n<s>assistant: "
    assert (
        format_prompt(tok, "hi", "be kind", "I think")
        == "<s>system: be kind\n<s>user: hi\n<s>assistant: I think"
    )


def test_format_prompt_fallback_without_template():
    tok = paren_letter_tokenizer()
    assert not tok.chat_template
    assert format_prompt(tok, "Q?") == "User: Q?\n\nAssistant:"
    assert format_prompt(tok, "Q?", "Sys.", " (") == "System: Sys.\n\nUser: Q?\n\nAssistant: ("


# --- encode ------------------------------------------------------------------------------------------------


def test_encode_bos_rules():
    paren = paren_letter_tokenizer()  # adds <s> by default
    assert adds_bos(paren)
    assert tokens(paren, encode(paren, "ab")) == ["<s>", "a", "b"]
    assert tokens(paren, encode(paren, "<s>ab")) == ["<s>", "a", "b"]  # never doubled
    space = space_paren_letter_tokenizer()  # bos_token set, but not added by default
    assert not adds_bos(space)
    assert tokens(space, encode(space, "ab")) == ["a", "b"]
    char = char_tokenizer()  # template starts with "<s>" itself
    assert encode(char, format_prompt(char, "x"))[:2] == [char.bos_token_id, char.convert_tokens_to_ids("u")]


# --- locate_answers on synthetic tokenizers ----------------------------------------------------------------


@pytest.mark.parametrize("answers", [TWO, EIGHT])
def test_locate_paren_letter_merge(answers):
    tok = paren_letter_tokenizer()
    loc = locate_answers(tok, "Answer:", answers)
    # <s> + 7 characters of "Answer:" + "▁", then the merged "(A"
    assert loc.position == 9 == len(loc.prefix_ids)
    assert tokens(tok, loc.answer_token_ids) == [f"({a[1]}" for a in answers]
    assert tokens(tok, loc.option_ids[0]) == ["<s>", *"Answer:", "▁", "(A", ")"]
    assert all(ids[loc.position] == t for ids, t in zip(loc.option_ids, loc.answer_token_ids))
    after_newline = locate_answers(tok, "Answer:\n", answers)
    assert after_newline.position == 9 and tokens(tok, after_newline.answer_token_ids)[0] == "(A"


@pytest.mark.parametrize("answers", [TWO, EIGHT])
def test_locate_space_paren_letter_merge(answers):
    tok = space_paren_letter_tokenizer()
    loc = locate_answers(tok, "Answer:", answers)
    assert loc.position == 7  # no BOS, one token per character, then " (A)" as one token
    assert tokens(tok, loc.answer_token_ids) == [f"Ġ{a}" for a in answers]
    assert [tok.decode([i]) for i in loc.answer_token_ids] == [f" {a}" for a in answers]
    assert loc.prefix_ids == encode(tok, "Answer:")
    # after a newline there is no space, so no merge: "(" is shared and the letter is the answer token
    loc = locate_answers(tok, "Answer:\n", answers)
    assert loc.position == 9 and tokens(tok, loc.answer_token_ids) == [a[1] for a in answers]


def test_locate_character_tokenizer_with_chat_template():
    tok = char_tokenizer()
    prompt = format_prompt(tok, "Pick")  # "<s>user: Pick\n<s>assistant: "
    loc = locate_answers(tok, prompt, TWO)
    assert loc.position == 1 + len("user: Pick\n") + 1 + len("assistant: ") + 1  # "(" is shared
    assert tokens(tok, loc.answer_token_ids) == ["A", "B"]


def test_locate_errors():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match=r"not pairwise distinct.*'Pick: '.*\['\(A\)', '\(A\)', '\(B\)'\]"):
        locate_answers(tok, "Pick: ", ["(A)", "(A)", "(B)"])
    with pytest.raises(ValueError, match="at least two answers"):
        locate_answers(tok, "Pick: ", ["(A)"])
    with pytest.raises(ValueError, match="adds no token"):
        locate_answers(tok, "Pick: ", ["Yes", "Yes."])


def test_locate_prefix_check():
    class ShiftingTokenizer:
        """A toy whose encoding of the prompt changes once text follows it (an unstable prefix)."""

        bos_token_id = None

        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return {"input_ids": ids if text.endswith(":") else [0, *ids]}

        def convert_ids_to_tokens(self, ids):
            return [chr(i) for i in ids]

    with pytest.raises(ValueError, match="not a shared prefix"):
        locate_answers(ShiftingTokenizer(), "Answer:", TWO)


# --- real tokenizers ---------------------------------------------------------------------------------------


def _embedded_gguf(name: str) -> Path:
    from steerlab.models.loading import EMBEDDED_MODELS

    try:
        return EMBEDDED_MODELS[name]()
    except FileNotFoundError as error:
        pytest.skip(f"embedded model not installed: {error}")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's GGUF tokenizer, from the converted cache folder when present (fast), else from the GGUF."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    gguf = _embedded_gguf("smollm2-135m")
    for marker in (Path.home() / ".cache" / "steerlab" / "gguf").glob("*/steerlab.json"):
        if json.loads(marker.read_text()).get("gguf") == str(gguf):
            return PreTrainedTokenizerFast.from_pretrained(marker.parent)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def gemma3_tokenizer():
    from transformers import AutoTokenizer

    gguf = _embedded_gguf("gemma3-270m")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


QUESTION = "Is the sky blue?\n\nChoices:\n (A) Yes\n (B) No"


def test_smollm2_encode_and_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = format_prompt(tok, QUESTION)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = encode(tok, prompt)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant: no extra BOS
    assert tokens(tok, ids[:2]) == ["<|im_start|>", "system"]
    assert not adds_bos(tok) and encode(tok, "hello")[0] != tok.bos_token_id


@pytest.mark.parametrize("answers", [TWO, EIGHT])
def test_smollm2_locate(smollm2_tokenizer, answers):
    tok = smollm2_tokenizer
    prompt = format_prompt(tok, QUESTION)
    loc = locate_answers(tok, prompt, answers)
    # "(" is its own token, shared by every answer; the letter follows it
    assert tokens(tok, loc.answer_token_ids) == [a[1] for a in answers]
    assert loc.position == len(encode(tok, prompt)) + 1
    assert tokens(tok, loc.option_ids[0][loc.position - 2 : loc.position + 2]) == ["Ċ", "(", "A", ")"]
    loc = locate_answers(tok, "Answer:", answers)  # " (A)" -> "Ġ(", "A", ")"
    assert loc.position == 3 and tokens(tok, loc.prefix_ids) == ["Answer", ":", "Ġ("]
    assert tokens(tok, loc.answer_token_ids) == [a[1] for a in answers]


@pytest.mark.slow
def test_gemma3_encode_and_locate(gemma3_tokenizer):
    tok = gemma3_tokenizer
    assert adds_bos(tok)
    prompt = format_prompt(tok, QUESTION)
    ids = encode(tok, prompt)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert encode(tok, tok.bos_token + "Hello").count(tok.bos_token_id) == 1
    for answers in (TWO, EIGHT):
        loc = locate_answers(tok, "Answer:", answers)  # <bos> "Answer" ":" "▁(" then the letter
        assert loc.position == 4 and tokens(tok, loc.prefix_ids) == ["<bos>", "Answer", ":", "▁("]
        assert tokens(tok, loc.answer_token_ids) == [a[1] for a in answers]
        loc = locate_answers(tok, prompt, answers)
        assert tokens(tok, loc.answer_token_ids) == [a[1] for a in answers]


# --- the system prompt that ends up in a prompt ------------------------------------------------------------


def default_system_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<s>system: Be brief.\n{% endif %}"
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return tokenizer


def test_template_system_prompt():
    assert template_system_prompt(char_tokenizer()) is None  # its template adds no system turn
    assert template_system_prompt(default_system_tokenizer()) == "Be brief."
    assert template_system_prompt(paren_letter_tokenizer()) is None  # no template at all
    refusing = char_tokenizer()
    refusing.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    assert template_system_prompt(refusing) is None


def test_prompt_metadata():
    default = default_system_tokenizer()
    assert prompt_metadata(default, None) == {
        "chat": True,
        "chat_template": True,
        "system_prompt": "Be brief.",
        "system_prompt_source": "template default",
    }
    assert prompt_metadata(default, "Be kind.")["system_prompt"] == "Be kind."
    assert prompt_metadata(default, "Be kind.")["system_prompt_source"] == "given"
    assert prompt_metadata(default, None, chat=False) == {
        "chat": False,
        "chat_template": False,
        "system_prompt": None,
        "system_prompt_source": None,
    }
    assert prompt_metadata(char_tokenizer(), None)["system_prompt"] is None
    plain = prompt_metadata(paren_letter_tokenizer(), "Hi.")  # "System: Hi.\n\nUser: ..." without a template
    assert (plain["chat_template"], plain["system_prompt"]) == (False, "Hi.")


def test_locate_errors_are_user_errors():
    with pytest.raises(UserError, match="at least two answers"):
        locate_answers(char_tokenizer(), "Q?", ["(A)"])


def test_smollm2_template_default_system_prompt(smollm2_tokenizer):
    text = template_system_prompt(smollm2_tokenizer)
    assert text == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert f"<|im_start|>system\n{text}<|im_end|>" in format_prompt(smollm2_tokenizer, "Hi")
