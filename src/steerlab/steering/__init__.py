"""Activation steering: extracting vectors from contrastive data and applying them."""

from steerlab.steering.actadd import ActAddVector, extract_actadd, generate_actadd
from steerlab.steering.extract import caa_items, extract_caa, extract_mean_difference, mean_activations
from steerlab.steering.gguf import ControlVectorFileError, export_control_vector, import_control_vector
from steerlab.steering.methods import extract_pca_center, extract_pca_diff, extract_probe
from steerlab.steering.vector import (
    STRONG_STEERING_RATIO,
    InvalidVectorError,
    LayerChoiceError,
    SteeringVector,
    StrongSteeringWarning,
    VectorError,
)

__all__ = [
    "ActAddVector",
    "STRONG_STEERING_RATIO",
    "ControlVectorFileError",
    "InvalidVectorError",
    "LayerChoiceError",
    "SteeringVector",
    "StrongSteeringWarning",
    "VectorError",
    "caa_items",
    "export_control_vector",
    "extract_actadd",
    "extract_caa",
    "extract_mean_difference",
    "extract_pca_center",
    "extract_pca_diff",
    "extract_probe",
    "generate_actadd",
    "import_control_vector",
    "mean_activations",
]
