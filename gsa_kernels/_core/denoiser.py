"""The one "call a model as a denoiser" of the package: samplers, the sigma_skip chooser, the k-diffusion
integration and the analysis tools all accept a callable denoiser(x, sigma) -> x0_hat or any object with
a .denoise(x, sigma) method (GaussianModel, GMM, DeltaMixture, LabeledGaussians)."""
from __future__ import annotations

from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_denoiser(model, name: str = "denoiser") -> Denoiser:
    """`model.denoise` for the package's data models, the callable itself otherwise; TypeError naming
    the argument for anything else."""
    denoise = getattr(model, "denoise", None)
    if callable(denoise):
        return denoise
    if callable(model):
        return model
    raise TypeError(f"{name} must be a callable denoiser(x, sigma) -> x0_hat or have a .denoise(x, sigma) "
                    f"method, got {type(model).__name__}")
