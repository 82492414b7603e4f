"""Hessian and loss-basin analysis: exact curvature products, Lanczos spectra, traces, densities,
subspace comparisons and the separable-submodule (hybrid task) experiment."""

from steerlab.hessian.density import SpectralDensity, slq_density
from steerlab.hessian.lanczos import Eigenpairs, lanczos, lanczos_tridiagonal
from steerlab.hessian.operator import CurvatureOperator, dense_matrix
from steerlab.hessian.params import block_slices, flatten, select_params, unflatten
from steerlab.hessian.spectra import blockwise_spectra, hessian_vs_ggn, subsample_spectra
from steerlab.hessian.subspace import (
    orthonormal,
    perturbation_sweep,
    perturbed,
    principal_angles,
    project_out,
    random_angle_baseline,
    specialisation,
    specialised_fraction,
)
from steerlab.hessian.tasks import LossTask, classification_task, lm_batches, lm_task
from steerlab.hessian.trace import TraceEstimate, hutchinson, hutchpp
from steerlab.hooks.modes import curvature_mode

__all__ = [
    "CurvatureOperator",
    "Eigenpairs",
    "LossTask",
    "SpectralDensity",
    "TraceEstimate",
    "block_slices",
    "blockwise_spectra",
    "classification_task",
    "curvature_mode",
    "dense_matrix",
    "flatten",
    "hessian_vs_ggn",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "lanczos_tridiagonal",
    "lm_batches",
    "lm_task",
    "orthonormal",
    "perturbation_sweep",
    "perturbed",
    "principal_angles",
    "project_out",
    "random_angle_baseline",
    "select_params",
    "slq_density",
    "specialisation",
    "specialised_fraction",
    "subsample_spectra",
    "unflatten",
]
