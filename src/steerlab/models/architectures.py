"""Where each architecture family keeps its decoder blocks, attention, MLP and final norm, and the other
facts steerlab needs about a family: whether its logits are the plain head, which modules store their
weight transposed, and which decoder block a module belongs to.

A causal LM is addressed through dotted attribute paths from the `*ForCausalLM` module. Add a family
with `register_architecture("my_model_type", ArchitectureSpec(...))`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from steerlab.errors import UserError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Dotted paths, from the causal-LM module, to the parts steerlab addresses."""

    layers: str  # the nn.ModuleList of decoder blocks
    attention: str  # attribute of one block
    mlp: str  # attribute of one block
    final_norm: str  # applied after the last block
    plain_head: bool = True  # logits are exactly the output embedding of the last hidden state


_LLAMA_LIKE = ArchitectureSpec("model.layers", "self_attn", "mlp", "model.norm")
_SOFT_CAPPED = ArchitectureSpec("model.layers", "self_attn", "mlp", "model.norm", plain_head=False)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    **{
        name: _LLAMA_LIKE
        for name in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma3_text",
            "phi3",
            "olmo2",
        )
    },
    "gemma2": _SOFT_CAPPED,  # tanh soft-capping of the logits after the head
    "gemma3": ArchitectureSpec(  # the multimodal wrapper: its text settings live in a sub-config
        "model.language_model.layers", "self_attn", "mlp", "model.language_model.norm", plain_head=False
    ),
    "phi": ArchitectureSpec("model.layers", "self_attn", "mlp", "model.final_layernorm"),
    "gpt2": ArchitectureSpec("transformer.h", "attn", "mlp", "transformer.ln_f"),
    "gpt_neox": ArchitectureSpec("gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm"),
}


# config settings some families apply to the logits after the head (scaling, soft-capping)
POST_HEAD_SETTINGS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


class UnknownArchitectureError(UserError):
    """The model's family is not in the registry."""


def register_architecture(model_type: str, spec: ArchitectureSpec) -> None:
    """Teach steerlab a new family, keyed by `model.config.model_type`."""
    ARCHITECTURES[model_type] = spec


def architecture_of(model: nn.Module) -> ArchitectureSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    known = ", ".join(sorted(ARCHITECTURES))
    raise UnknownArchitectureError(
        f"steerlab does not know where the decoder blocks of model_type={model_type!r} "
        f"({type(model).__name__}) are. Known: {known}. Register it with "
        "steerlab.models.register_architecture(model_type, ArchitectureSpec(layers='model.layers', "
        "attention='self_attn', mlp='mlp', final_norm='model.norm'))."
    )


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_submodule(model, architecture_of(model).layers)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def resolve_layer(model: nn.Module, layer: int) -> int:
    """Map a possibly negative layer index onto 0..n-1, with a clear error when out of range."""
    n = num_layers(model)
    if not -n <= layer < n:
        raise IndexError(
            f"layer {layer} is out of range for a model with {n} decoder layers (use 0..{n - 1} or -{n}..-1)"
        )
    return layer % n


def block(model: nn.Module, layer: int) -> nn.Module:
    return decoder_layers(model)[resolve_layer(model, layer)]


def attention(model: nn.Module, layer: int) -> nn.Module:
    return get_submodule(block(model, layer), architecture_of(model).attention)


def mlp(model: nn.Module, layer: int) -> nn.Module:
    return get_submodule(block(model, layer), architecture_of(model).mlp)


def final_norm(model: nn.Module) -> nn.Module:
    return get_submodule(model, architecture_of(model).final_norm)


def hidden_size(model: nn.Module) -> int:
    config = model.config
    text_config = getattr(config, "text_config", None) or config
    for name in ("hidden_size", "n_embd", "d_model"):
        if hasattr(text_config, name):
            return int(getattr(text_config, name))
    raise UnknownArchitectureError(f"cannot find the hidden size in {type(config).__name__}")


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head when the model's logits are exactly `head(last hidden state)` (the family is
    registered with `plain_head=True` and its config scales nothing after the head), else None (then
    callers run the model's own head)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    spec = ARCHITECTURES.get(getattr(config, "model_type", None))
    if spec is None or not spec.plain_head or not isinstance(head, nn.Linear):
        return None
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in POST_HEAD_SETTINGS):
        return None
    return head


def is_transposed_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is stored as [in, out] (the `Conv1D` of GPT-2 in transformers)."""
    return type(module).__name__ == "Conv1D"


def layers_of(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, int | None]:
    """The index of the decoder block containing each module, from the model's structure (None for a
    module outside the blocks, or for every module when the model's family is not registered)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    owner: dict[int, int] = {}
    if model_type in ARCHITECTURES:
        for index, layer in enumerate(decoder_layers(model)):
            owner.update({id(sub): index for sub in layer.modules()})
    return {name: owner.get(id(module)) for name, module in modules.items()}
