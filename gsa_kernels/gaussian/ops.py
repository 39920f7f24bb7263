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


def _lam_perp(lam_perp, mean):
    if isinstance(lam_perp, torch.Tensor) or not isinstance(mean, torch.Tensor):
        return lam_perp
    return torch.tensor(float(lam_perp), dtype=compute_dtype(mean), device=mean.device)


def _on_request(check, x, eigvals, lam_perp):
    if check and isinstance(x, torch.Tensor) and x.device.type != "cpu":  # the CPU op checks values itself
        check_values(eigvals=eigvals, lam_perp=lam_perp)


def project(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Eigenbasis coefficients c = U^T (x - mu): [B, ...] -> [B, r]."""
    return call_op(torch.ops.gsa.project, x, mean, basis)


def gaussian_denoise(x, mean, basis, eigvals, lam_perp, sigma, *, check_values: bool = False) -> torch.Tensor:
    """Gaussian posterior mean D(x; sigma) = E[x0 | x] (docs/math.md section 2.1)."""
    lam_perp = _lam_perp(lam_perp, mean)
    _on_request(check_values, x, eigvals, lam_perp)
    s = sigma_arg("sigma", sigma, x, dtype=compute_dtype(x, mean), check_values=check_values)
    return call_op(torch.ops.gsa.gaussian_denoise, x, mean, basis, eigvals, lam_perp, s)


def gaussian_score(x, mean, basis, eigvals, lam_perp, sigma, *, check_values: bool = False) -> torch.Tensor:
    """Score grad_x log p_sigma(x) of the noised Gaussian (docs/math.md section 2.1)."""
    lam_perp = _lam_perp(lam_perp, mean)
    _on_request(check_values, x, eigvals, lam_perp)
    s = sigma_arg("sigma", sigma, x, dtype=compute_dtype(x, mean), check_values=check_values)
    return call_op(torch.ops.gsa.gaussian_score, x, mean, basis, eigvals, lam_perp, s)


def teleport(x, mean, basis, eigvals, lam_perp, sigma_from, sigma_to, *, check_values: bool = False) -> torch.Tensor:
    """Exact probability-flow-ODE solution for the Gaussian from sigma_from (> 0) to sigma_to (>= 0)."""
    lam_perp = _lam_perp(lam_perp, mean)
    _on_request(check_values, x, eigvals, lam_perp)
    dt = compute_dtype(x, mean)
    s0 = sigma_arg("sigma_from", sigma_from, x, dtype=dt, check_values=check_values)
    s1 = sigma_arg("sigma_to", sigma_to, x, dtype=dt, allow_zero=True, check_values=check_values)
    return call_op(torch.ops.gsa.teleport, x, mean, basis, eigvals, lam_perp, s0, s1)
