"""CUDA kernels of the mixture ops, registered with the dispatcher: the Triton kernels of
triton_mixture.py (float64 inputs run the same kernels in float64). Each kernel runs the one meta check
of its arguments (meta.py).
"""
from __future__ import annotations

import torch

from .. import config
from . import meta, vjp_torch
from .ops import mean_of_rows

try:  # Triton is optional on CPU-only installs.
    from . import triton_mixture
except ImportError:  # pragma: no cover
    triton_mixture = None


def _need_triton():
    if triton_mixture is None:
        raise RuntimeError("gsa mixture ops on CUDA need triton (pip install triton)")


def gmm_forward_cuda(x, log_weights, means, bases, eigvals, lam_perp, sigma, center=None, score=False,
                     return_weights=False, chunk_size=0):
    B, d, _, r = meta.check_mixture(x, log_weights, means, bases, eigvals, lam_perp, sigma, center)
    _need_triton()
    ctr = center if center is not None else mean_of_rows(means)
    out, log_z, w = triton_mixture.gmm_forward(
        x.reshape(B, d), log_weights, means, bases if r > 0 else None, eigvals if r > 0 else None, lam_perp, ctr,
        sigma, score=score, return_weights=return_weights, precision=config.get_precision())
    return out.to(x.dtype).reshape(x.shape), log_z, w


def delta_mixture_forward_cuda(x, points, log_weights, sigma, center=None, score=False, chunk_size=0):
    B, d, _, _ = meta.check_mixture(x, log_weights, points, None, None, None, sigma, center, "points")
    _need_triton()
    ctr = center if center is not None else mean_of_rows(points)
    out, log_z = triton_mixture.delta_mixture_forward(x.reshape(B, d), points, log_weights, ctr, sigma, score=score,
                                                      precision=config.get_precision())
    return out.to(x.dtype).reshape(x.shape), log_z


torch.library.register_kernel("gsa::gmm_forward", "cuda")(gmm_forward_cuda)
torch.library.register_kernel("gsa::delta_mixture_forward", "cuda")(delta_mixture_forward_cuda)


# The VJP ops on CUDA: the chunked PyTorch pass of vjp_torch.py (memory flat in K; no Triton kernel yet).
def gmm_vjp_cuda(x, log_weights, means, bases, eigvals, lam_perp, sigma, frame, v, center=None, chunk_size=0):
    meta.check_mixture(x, log_weights, means, bases, eigvals, lam_perp, sigma, center)
    meta.check_vjp_operands(x, frame, v)
    return vjp_torch.mixture_vjp(x, log_weights, means, bases, eigvals, lam_perp, sigma, frame, v)


def delta_mixture_vjp_cuda(x, points, log_weights, sigma, frame, v, center=None, chunk_size=0):
    meta.check_mixture(x, log_weights, points, None, None, None, sigma, center, "points")
    meta.check_vjp_operands(x, frame, v)
    return vjp_torch.mixture_vjp(x, log_weights, points, None, None, None, sigma, frame, v)


torch.library.register_kernel("gsa::gmm_vjp", "cuda")(gmm_vjp_cuda)
torch.library.register_kernel("gsa::delta_mixture_vjp", "cuda")(delta_mixture_vjp_cuda)
