"""Shared fixtures: tiny random models of every supported family, a character tokenizer, SmolLM2."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

from steerlab.models import load_model, wrap

# One thread per test process: tiny models are dominated by threading overhead, and `make test` runs
# two workers, whose oversubscribed OpenMP threads would thrash on a small machine.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = 128


def tiny_config(family: str):
    """A 4-layer, 32-wide config of `family` with a vocabulary of 128."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB, num_hidden_layers=4, num_attention_heads=4, hidden_size=32, intermediate_size=64
    )
    llama_like = dict(
        **common,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "gemma":
        return tf.GemmaConfig(**llama_like, head_dim=8)
    if family == "gemma2":
        return tf.Gemma2Config(**llama_like, head_dim=8, sliding_window=64)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**llama_like, head_dim=8, sliding_window=64)
    if family == "phi":
        return tf.PhiConfig(
            **common, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2
        )
    if family == "phi3":
        return tf.Phi3Config(**llama_like)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=32, n_positions=256, bos_token_id=1, eos_token_id=2
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox"]


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "eager"):
    """A tiny random model. Left padding in float64 needs attn="sdpa": HF's eager mask gives NaN there."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation=attn)
    return model.to(dtype).eval()


def micro_llama(
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    hidden: int = 16,
    intermediate: int = 32,
    layers: int = 2,
):
    """A 2-layer, 16-wide Llama with a 64-token vocabulary (pad id 0): small enough to materialise Fishers."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype).eval()


def char_tokenizer():
    """A character-level fast tokenizer (ids < 128) with BOS/EOS/PAD and a simple chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return tokenizer


@pytest.fixture
def tiny_lm():
    """A float64 tiny Llama with the character tokenizer, wrapped as a LoadedModel."""
    return wrap(tiny_model("llama"), char_tokenizer(), name="tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (float32), loaded once per test session."""
    try:
        return load_model("smollm2-135m")
    except FileNotFoundError as error:
        pytest.skip(f"embedded model not installed: {error}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def repeng_extract(monkeypatch):
    """repeng 0.4's `extract` module (a benchmark peer installed with --no-deps by `make setup`)."""
    import numpy as np

    monkeypatch.setattr(np, "float_", np.float64, raising=False)  # repeng 0.4 annotates with NumPy 1 names
    return pytest.importorskip(
        "repeng.extract", reason="repeng 0.4 is not installed (make setup installs it)"
    )
