"""Gaussian mixtures and the training-set (delta mixture) score (docs/math.md section 3).

ops.py: the Python API; meta.py: the argument check of the fake and CUDA kernels; cuda.py and
triton_mixture.py: the GPU kernels; model.py: GMM and DeltaMixture; distributed.py: shards over ranks.
reference.py is the float64 oracle of the tests and benchmarks (not imported here). Partial results of
shards merge exactly with merge_normalized (or merge_states for raw streaming states).
"""
from .._core.lse import merge_normalized, merge_states
from . import cuda, meta  # noqa: F401  (registers the CUDA and fake kernels)
from .model import GMM, DeltaMixture
from .ops import (
    MixtureOutput,
    check_values,
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
    "check_values",
    "merge_states",
    "merge_normalized",
]
