"""gsa_kernels: fused kernels for the Gaussian score approximation of diffusion models.

Importing the package loads the op library, so torch.ops.gsa.* is available afterwards.
"""
from . import config, frames
from .gaussian import gaussian_denoise, gaussian_score, project, teleport
from .gaussian.model import GaussianModel

__version__ = "0.1.0"

__all__ = [
    "config",
    "frames",
    "GaussianModel",
    "project",
    "gaussian_denoise",
    "gaussian_score",
    "teleport",
]
