"""Family facts of the architecture registry: which decoder block holds a module, transposed linear
layers, plain heads."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from steerlab.models import attention, mlp
from steerlab.models.architectures import is_transposed_linear, layers_of, plain_head


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_maps_modules_to_their_decoder_layer(family):
    model = tiny_model(family)
    modules = {f"mlp{layer}": mlp(model, layer) for layer in range(4)}
    modules["attn2"] = attention(model, 2)
    modules["head"] = model.get_output_embeddings()
    assert layers_of(model, modules) == {"mlp0": 0, "mlp1": 1, "mlp2": 2, "mlp3": 3, "attn2": 2, "head": None}


def test_an_unregistered_family_has_no_layers():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    assert layers_of(model, {"mlp0": mlp(tiny_model("llama"), 0)}) == {"mlp0": None}


def test_registry_knows_transposed_linear_layers():
    gpt2, llama = tiny_model("gpt2"), tiny_model("llama")
    assert is_transposed_linear(mlp(gpt2, 0).c_fc)
    assert not is_transposed_linear(mlp(llama, 0).up_proj)
    assert not is_transposed_linear(torch.nn.Linear(2, 3))


def test_a_config_that_scales_the_logits_has_no_plain_head():
    model = tiny_model("llama")
    assert plain_head(model) is model.lm_head
    model.config.logit_scale = 0.5
    assert plain_head(model) is None
    model.config.logit_scale = 1.0
    assert plain_head(model) is model.lm_head
    assert plain_head(tiny_model("gemma2")) is None  # soft-capped logits: registered plain_head=False
