"""Model access: loading and addressing the parts of every supported architecture."""

from steerlab.models.architectures import (
    ARCHITECTURES,
    ArchitectureSpec,
    UnknownArchitectureError,
    architecture_of,
    attention,
    block,
    decoder_layers,
    final_norm,
    hidden_size,
    mlp,
    num_layers,
    register_architecture,
    resolve_layer,
)
from steerlab.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    LoadedModel,
    ModelInfo,
    ModelNotFoundError,
    load_model,
    wrap,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ArchitectureSpec",
    "LoadedModel",
    "ModelInfo",
    "ModelNotFoundError",
    "UnknownArchitectureError",
    "architecture_of",
    "attention",
    "block",
    "decoder_layers",
    "final_norm",
    "hidden_size",
    "load_model",
    "mlp",
    "num_layers",
    "register_architecture",
    "resolve_layer",
    "wrap",
]
