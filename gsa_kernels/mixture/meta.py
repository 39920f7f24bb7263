"""Shape, dtype and device checks of the mixture ops (no data reads) and their fake kernels.

The one Python check of a raw op's inputs: the fake kernels and the CUDA kernels (mixture/cuda.py) call
check_mixture; the CPU kernels check the same in C++. check_components serves the model constructors,
which have parameters but no x yet.
"""
from __future__ import annotations

import math

import torch

from .. import _library
from .._core.dtypes import compute_dtype
from .._validation import FLOAT_DTYPES, check_sigma_meta, check_tensor

_library.load_library()


def check_components(log_weights, means, bases=None, eigvals=None, lam_perp=None, *, means_name="means",
                     d=None, device=None, dtypes=FLOAT_DTYPES) -> tuple[int, int, int]:
    """(d, K, r) of valid mixture components; d and device (from x) are checked when given."""
    check_tensor(means_name, means, ndim=2, dtypes=dtypes, device=device)
    device = means.device
    K, d_means = means.shape
    if d is not None and d_means != d:
        raise ValueError(f"{means_name} must have shape [K, d] with d = {d} (from x), got {tuple(means.shape)}")
    d = d_means
    if K == 0:
        raise ValueError(f"{means_name} must hold at least one component (K >= 1), got K = 0")
    if d == 0:
        raise ValueError(f"{means_name} must have shape [K, d] with d >= 1, got {tuple(means.shape)}")
    if log_weights is not None:
        check_tensor("log_weights", log_weights, ndim=1, dtypes=dtypes, device=device)
        if log_weights.shape[0] != K:
            raise ValueError(f"log_weights must have shape [K] = [{K}], got {tuple(log_weights.shape)}")
    if (bases is None) != (eigvals is None):
        missing, given = ("eigvals", "bases") if bases is not None else ("bases", "eigvals")
        raise ValueError(f"{missing} must be given with {given}")
    r = 0
    if bases is not None:
        check_tensor("bases", bases, ndim=3, dtypes=dtypes, device=device)
        k_bases, d_bases, r = bases.shape
        if k_bases != K or d_bases != d:
            raise ValueError(f"bases must have shape [K, d, r] = [{K}, {d}, r], got {tuple(bases.shape)}")
        if r > d:
            raise ValueError(f"bases must have r <= d = {d}, got r = {r}")
        check_tensor("eigvals", eigvals, ndim=2, dtypes=dtypes, device=device)
        if eigvals.shape != (K, r):
            raise ValueError(f"eigvals must have shape [K, r] = [{K}, {r}], got {tuple(eigvals.shape)}")
    if lam_perp is not None:
        check_tensor("lam_perp", lam_perp, ndim=1, dtypes=dtypes, device=device)
        if lam_perp.shape[0] != K:
            raise ValueError(f"lam_perp must have shape [K] = [{K}], got {tuple(lam_perp.shape)}")
    return d, K, r


def check_mixture(x, log_weights, means, bases, eigvals, lam_perp, sigma, center,
                  means_name="means") -> tuple[int, int, int, int]:
    """(B, d, K, r) of valid op arguments; ValueError / TypeError naming the first bad one."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B, ...] with at least one data dimension, got {tuple(x.shape)}")
    device = x.device
    d, K, r = check_components(log_weights, means, bases, eigvals, lam_perp, means_name=means_name,
                               d=x.shape[1] if x.dim() == 2 else math.prod(x.shape[1:]), device=device)
    if center is not None:
        check_tensor("center", center, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        if center.shape[0] != d:
            raise ValueError(f"center must have shape [d] = [{d}], got {tuple(center.shape)}")
    check_sigma_meta("sigma", sigma, x)
    return x.shape[0], d, K, r


@torch.library.register_fake("gsa::gmm_forward")
def _gmm_fake(x, log_weights, means, bases, eigvals, lam_perp, sigma, center=None, score=False,
              return_weights=False, chunk_size=0):
    B, _, K, _ = check_mixture(x, log_weights, means, bases, eigvals, lam_perp, sigma, center)
    ct = compute_dtype(x, log_weights, means, bases, eigvals, lam_perp)
    return (x.new_empty(x.shape), x.new_empty((B,), dtype=torch.float64),
            x.new_empty((B, K) if return_weights else (0,), dtype=ct))


@torch.library.register_fake("gsa::delta_mixture_forward")
def _delta_fake(x, points, log_weights, sigma, center=None, score=False, chunk_size=0):
    B, _, _, _ = check_mixture(x, log_weights, points, None, None, None, sigma, center, "points")
    return x.new_empty(x.shape), x.new_empty((B,), dtype=torch.float64)


def check_vjp_operands(x, frame, v) -> None:
    """frame and v of the VJP ops: shaped like x, float, on x's device."""
    for name, t in (("frame", frame), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, device=x.device)
        if tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")


@torch.library.register_fake("gsa::gmm_vjp")
def _gmm_vjp_fake(x, log_weights, means, bases, eigvals, lam_perp, sigma, frame, v, center=None, chunk_size=0):
    check_mixture(x, log_weights, means, bases, eigvals, lam_perp, sigma, center)
    check_vjp_operands(x, frame, v)
    return x.new_empty(x.shape)


@torch.library.register_fake("gsa::delta_mixture_vjp")
def _delta_vjp_fake(x, points, log_weights, sigma, frame, v, center=None, chunk_size=0):
    check_mixture(x, log_weights, points, None, None, None, sigma, center, "points")
    check_vjp_operands(x, frame, v)
    return x.new_empty(x.shape)
