"""Activation steering: extracting vectors from contrastive data and applying them."""

from steerlab.steering.extract import extract_caa, extract_mean_difference, mean_activations
from steerlab.steering.vector import SteeringVector

__all__ = ["SteeringVector", "extract_caa", "extract_mean_difference", "mean_activations"]
