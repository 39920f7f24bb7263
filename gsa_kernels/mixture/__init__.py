"""Gaussian mixtures and the training-set (delta mixture) score (docs/math.md section 3)."""
from . import reference
from .model import GMM, DeltaMixture
from .ops import (
    MixtureOutput,
    delta_mixture_denoise,
    delta_mixture_forward,
    delta_mixture_log_prob,
    delta_mixture_score,
    gmm_denoise,
    gmm_forward,
    gmm_log_prob,
    gmm_score,
)

__all__ = [
    "reference",
    "GMM",
    "DeltaMixture",
    "MixtureOutput",
    "gmm_forward",
    "gmm_denoise",
    "gmm_score",
    "gmm_log_prob",
    "delta_mixture_forward",
    "delta_mixture_denoise",
    "delta_mixture_score",
    "delta_mixture_log_prob",
]
