import json

import pytest
import torch

from conftest import FAMILIES, char_tokenizer, tiny_model
from steerlab import hooks
from steerlab.models import (
    UnknownArchitectureError,
    attention,
    block,
    decoder_layers,
    hidden_size,
    load_model,
    mlp,
    num_layers,
    resolve_layer,
    wrap,
)
from steerlab.models.loading import convert_gguf, repair_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_finds_parts_and_capture_matches_hidden_states(family):
    model = tiny_model(family)
    assert num_layers(model) == 4 and hidden_size(model) == 32
    for layer in range(4):
        assert isinstance(attention(model, layer), torch.nn.Module)
        assert isinstance(mlp(model, layer), torch.nn.Module)
    assert block(model, -1) is decoder_layers(model)[3]
    ids = torch.randint(3, 100, (2, 9))
    with hooks.capture_residual(model, [0, 1, -2]) as captured:
        out = model(ids, output_hidden_states=True)
    assert sorted(captured) == [0, 1, 2]
    for layer in (0, 1, 2):  # the last layer's hidden state has the final norm applied by HF
        torch.testing.assert_close(captured[layer], out.hidden_states[layer + 1], rtol=0, atol=0)


def test_layer_index_errors():
    model = tiny_model("llama")
    assert resolve_layer(model, -4) == 0
    with pytest.raises(IndexError, match="out of range for a model with 4 decoder layers"):
        resolve_layer(model, 4)


def test_unknown_architecture_names_how_to_register():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UnknownArchitectureError, match="register_architecture"):
        num_layers(model)


def test_repair_tokenizer_fixes_eos_bos_and_pad():
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    tokenizer.add_bos_token = True
    model = tiny_model("llama")
    model.config.eos_token_id = 1  # pretend the config names another EOS
    model.generation_config.eos_token_id = 1
    repairs = repair_tokenizer(tokenizer, model)
    assert tokenizer.eos_token_id == 1
    assert tokenizer.add_bos_token is False  # the template already starts with <s>
    assert tokenizer.pad_token_id is not None
    assert len(repairs) == 3


def test_load_local_folder_round_trip(tmp_path):
    model = tiny_model("llama", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert lm.info.file_sha256 and lm.info.num_layers == 4
    ids = torch.randint(3, 100, (1, 6))
    torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)


def test_wrap_records_model_info():
    lm = wrap(tiny_model("gpt2"), char_tokenizer(), name="tiny")
    assert lm.info.model_type == "gpt2" and lm.info.hidden_size == 32
    json.dumps(lm.info.to_dict())


def test_repair_drops_a_bos_added_while_add_bos_token_reads_false(tmp_path):
    """Like SmolLM2's Hugging Face folder under transformers 5: the post-processor prepends BOS, the
    attribute says it does not, and the chat template starts with BOS already."""
    from tokenizers import processors

    from steerlab.data.templating import adds_bos, encode

    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    plain = tokenizer("The weather", add_special_tokens=False)["input_ids"]
    tiny_model("llama", dtype=torch.float32).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert lm.tokenizer.add_bos_token is False and lm.tokenizer.bos_token_id == 1
    assert lm.tokenizer("The weather")["input_ids"] == plain  # was [1, *plain]
    assert encode(lm.tokenizer, "The weather") == plain and not adds_bos(lm.tokenizer)
    assert any("BOS" in repair for repair in lm.info.tokenizer_repairs)


def _no_network(monkeypatch, error: Exception) -> None:
    import transformers

    def refuse(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_model_name_typo_lists_embedded_names_before_any_network_access(tmp_path, monkeypatch):
    from steerlab.errors import UserError
    from steerlab.models import ModelNotFoundError

    monkeypatch.chdir(tmp_path)
    _no_network(monkeypatch, AssertionError("the hub was asked"))
    with pytest.raises(ModelNotFoundError) as caught:
        load_model("smollm2-135")
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message
    assert message.startswith("model 'smollm2-135' is no embedded model, local folder or .gguf file;")
    assert "did you mean 'smollm2-135m'?" in message
    assert "embedded models: smollm2-135m, gemma3-270m" in message and "need the network" in message
    with pytest.raises(ModelNotFoundError, match="is no such .gguf file"):
        load_model(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model folder"):
        load_model("notes.txt")


def test_hub_id_that_cannot_be_fetched_says_so_in_one_line(tmp_path, monkeypatch):
    from steerlab.models import ModelNotFoundError

    monkeypatch.chdir(tmp_path)
    _no_network(
        monkeypatch, OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore")
    )
    with pytest.raises(ModelNotFoundError) as caught:
        load_model("SomeOrg/no-such-model")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("model 'SomeOrg/no-such-model' was not found locally nor fetched from the hub")
    assert "We couldn't connect to 'https://huggingface.co'" in message
    assert "embedded models: smollm2-135m, gemma3-270m" in message and "need the network" in message
    with pytest.raises(ModelNotFoundError, match="'gpt2' was not found locally nor fetched from the hub"):
        load_model("gpt2")  # a single-word hub id is asked for, not refused as a typo


@pytest.mark.slow
def test_embedded_gguf_cache_reproduces_the_gguf_model(smollm2):
    """The cached safetensors checkpoint gives the GGUF model's logits; a second load is fast."""
    import time
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    gguf = Path(smollm2.info.source)
    folder = convert_gguf(gguf, smollm2.info.file_sha256)
    assert (folder / "model.safetensors").exists()
    start = time.perf_counter()
    again = load_model("smollm2-135m")
    assert time.perf_counter() - start < 10
    assert smollm2.info.num_layers == 30 and smollm2.info.hidden_size == 576
    assert smollm2.tokenizer.eos_token_id == 2  # <|im_end|>, as in the model config
    assert smollm2.tokenizer.pad_token_id is not None
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253]])
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, gguf_model(ids).logits)


def test_subpackages_load_on_first_use():
    import steerlab

    assert steerlab.steering.extract_caa is not None and steerlab.hooks.Positions is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        steerlab.nope  # noqa: B018
