"""The Python API of the Gaussian ops: numbers become tensors, then one torch.ops.gsa call.

The raw ops check their own arguments (C++ on CPU, meta.py on GPU and for fake tensors); their errors
reach the caller as TypeError / ValueError naming the argument (_core/errors.py). Values of GPU
tensors (finite, non-negative variances, positive sigma) are read only on request: check_values=True
here, or check_values() once for parameters used many times (GaussianModel does it at construction
and on load).
"""
from __future__ import annotations

import torch

from .. import _library
from .._core.dtypes import compute_dtype
from .._core.errors import call_op
from .._validation import check_finite, check_nonneg, sigma_arg
from . import autograd, cuda, meta  # noqa: F401  (registers the autograd, CUDA and fake kernels)

_library.load_library()


def check_values(mean=None, basis=None, eigvals=None, lam_perp=None) -> None:
    """ValueError naming the first parameter with a bad value: mean and basis must be finite, eigvals and
    lam_perp finite and >= 0. Reads the data (a device sync on GPU), unless config.validation is off."""
    for name, t in (("mean", mean), ("basis", basis)):
        if t is not None:
            check_finite(name, t)
    for name, t in (("eigvals", eigvals), ("lam_perp", lam_perp)):
        if t is not None:
            check_nonneg(name, t)


def _lam_perp(lam_perp, mean, x, eigvals, check: bool):
    """lam_perp as a tensor (a number becomes one in mean's compute dtype); with check, the values of
    eigvals and lam_perp of a GPU call (the CPU op checks values itself)."""
    if not isinstance(lam_perp, torch.Tensor) and isinstance(mean, torch.Tensor):
        lam_perp = torch.tensor(float(lam_perp), dtype=compute_dtype(mean), device=mean.device)
    if check and isinstance(x, torch.Tensor) and not x.is_cpu:
        check_values(eigvals=eigvals, lam_perp=lam_perp)
    return lam_perp


# The raw ops, looked up once (each torch.ops attribute access is a namespace lookup).
_PROJECT, _DENOISE, _SCORE, _TELEPORT = (torch.ops.gsa.project, torch.ops.gsa.gaussian_denoise,
                                         torch.ops.gsa.gaussian_score, torch.ops.gsa.teleport)


def project(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Eigenbasis coefficients c = U^T (x - mu): [B, ...] -> [B, r]."""
    return call_op(_PROJECT, x, mean, basis)


def gaussian_denoise(x, mean, basis, eigvals, lam_perp, sigma, *, check_values: bool = False) -> torch.Tensor:
    """Gaussian posterior mean D(x; sigma) = E[x0 | x] (docs/math.md section 2.1)."""
    if check_values or not isinstance(lam_perp, torch.Tensor):
        lam_perp = _lam_perp(lam_perp, mean, x, eigvals, check_values)
    s = sigma_arg("sigma", sigma, x, like=mean, check_values=check_values)
    return call_op(_DENOISE, x, mean, basis, eigvals, lam_perp, s)


def gaussian_score(x, mean, basis, eigvals, lam_perp, sigma, *, check_values: bool = False) -> torch.Tensor:
    """Score grad_x log p_sigma(x) of the noised Gaussian (docs/math.md section 2.1)."""
    if check_values or not isinstance(lam_perp, torch.Tensor):
        lam_perp = _lam_perp(lam_perp, mean, x, eigvals, check_values)
    s = sigma_arg("sigma", sigma, x, like=mean, check_values=check_values)
    return call_op(_SCORE, x, mean, basis, eigvals, lam_perp, s)


def teleport(x, mean, basis, eigvals, lam_perp, sigma_from, sigma_to, *, check_values: bool = False) -> torch.Tensor:
    """Exact probability-flow-ODE solution for the Gaussian from sigma_from (> 0) to sigma_to (>= 0)."""
    if check_values or not isinstance(lam_perp, torch.Tensor):
        lam_perp = _lam_perp(lam_perp, mean, x, eigvals, check_values)
    s0 = sigma_arg("sigma_from", sigma_from, x, like=mean, check_values=check_values)
    s1 = sigma_arg("sigma_to", sigma_to, x, like=mean, allow_zero=True, check_values=check_values)
    return call_op(_TELEPORT, x, mean, basis, eigvals, lam_perp, s0, s1)
