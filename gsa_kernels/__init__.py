"""gsa_kernels: fused kernels for the Gaussian score approximation of diffusion models.

Importing the package loads the op library, so torch.ops.gsa.* is available afterwards.
"""
from . import config, frames
from .gaussian import gaussian_denoise, gaussian_score, project, teleport
from .gaussian.model import GaussianModel
from .mixture import (DeltaMixture, GMM, delta_mixture_denoise, delta_mixture_forward, delta_mixture_log_prob,
                      delta_mixture_score, gmm_denoise, gmm_forward, gmm_log_prob, gmm_score)
from . import integrations, sampling

__version__ = "0.1.0"

__all__ = [
    "config",
    "frames",
    "sampling",
    "integrations",
    "GaussianModel",
    "project",
    "gaussian_denoise",
    "gaussian_score",
    "teleport",
    "GMM",
    "DeltaMixture",
    "gmm_forward",
    "gmm_denoise",
    "gmm_score",
    "gmm_log_prob",
    "delta_mixture_forward",
    "delta_mixture_denoise",
    "delta_mixture_score",
    "delta_mixture_log_prob",
]
