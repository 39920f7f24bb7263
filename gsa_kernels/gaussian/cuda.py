"""CUDA kernels of the Gaussian ops, registered with the dispatcher: the Triton kernels
(triton_gaussian.py) for float32 and half storage; float64 inputs (or a missing Triton) take the
unfused PyTorch maps (maps.py). Each kernel runs the one meta check of its arguments (meta.py).
"""
from __future__ import annotations

import functools

import torch

from .. import config
from .._core.cache import as_contiguous
from .._core.dtypes import compute_dtype, sigma_floor
from . import maps, meta
from .map_kind import OP_MAP_KINDS, TELEPORT

try:  # Triton is optional: without it, CUDA tensors run the unfused PyTorch path.
    from . import triton_gaussian
except ImportError:  # pragma: no cover
    triton_gaussian = None


SIGMA_FLOOR_F32 = sigma_floor(torch.float32)


def _sigma_vector(sigma, batch, dtype, floor=None):
    """sigma as a contiguous [B] vector of `dtype` (floored at `floor` if given): itself when it already is
    one and no floor is asked for; else one op for a [B] sigma of `dtype` (the models' case), two for a
    scalar or [1] sigma (an expanded view, then the op that writes the vector)."""
    s = sigma if sigma.dtype == dtype else sigma.to(dtype)
    if s.dim() != 1 or s.shape[0] != batch:
        s = s.expand(batch)
    if floor is not None:
        return s.clamp_min(floor)  # a new dense [B] vector, also from an expanded view
    return s if s.is_contiguous() else s.contiguous()


# t itself when contiguous float32, else a cached copy (a partial: no Python frame of its own per call).
_f32 = functools.partial(as_contiguous, dtype=torch.float32)


def project_cuda(x, mean, basis):
    batch, d, _ = meta.check_gaussian(x, mean, basis)
    x2 = x.reshape(batch, d)
    ct = compute_dtype(x, mean, basis)
    if triton_gaussian is None or ct == torch.float64:
        return ((x2.to(ct) - mean.to(ct)) @ basis.to(ct)).to(x.dtype)
    c = triton_gaussian.project(x2.contiguous(), _f32(mean), _f32(basis), config.kernel_precision(x.device))
    return c.to(x.dtype)


def map_cuda(kind: int):
    """The CUDA kernel of one map (map_kind.DENOISE, SCORE or TELEPORT)."""

    def kernel(x, mean, basis, eigvals, lam_perp, sigma_a, sigma_b=None):
        batch, d, r = meta.check_map(kind, x, mean, basis, eigvals, lam_perp, sigma_a, sigma_b)
        ct = compute_dtype(x, mean, basis, eigvals)
        if triton_gaussian is None or ct == torch.float64:
            sigma_b = sigma_a if sigma_b is None else sigma_b
            x2 = x.reshape(batch, d)
            s_a = _sigma_vector(sigma_a, batch, ct)
            s_b = _sigma_vector(sigma_b, batch, ct) if kind == TELEPORT else None
            out = maps.apply_map(kind, x2.to(ct), mean.to(ct), basis.to(ct), eigvals.to(ct), lam_perp.to(ct),
                                 s_a, s_b, full_rank=r == d)
            return out.to(x.dtype).reshape(x.shape)
        # The hot path: parameters as they are when the model already holds contiguous float32 (else a
        # cached copy), one sigma vector for the maps of one sigma, no other copies (and no views for a
        # contiguous [B, d] x, the model's case).
        x2 = x if x.dim() == 2 and x.is_contiguous() else x.contiguous().view(batch, d)
        out = torch.empty_like(x2)
        # sigma_from floored so that sigma^2 stays normal (no 0 / 0 with a zero variance), as in maps.py.
        s_a = _sigma_vector(sigma_a, batch, torch.float32, SIGMA_FLOOR_F32)
        s_b = s_a if kind != TELEPORT else _sigma_vector(sigma_b, batch, torch.float32)
        triton_gaussian.gaussian_map(kind, x2, _f32(mean), _f32(basis), _f32(eigvals), _f32(lam_perp), s_a, s_b,
                                     out, config.kernel_precision(x.device))
        return out if x.dim() == 2 else out.view(x.shape)

    return kernel


torch.library.register_kernel("gsa::project", "cuda")(project_cuda)
for _op, _kind in OP_MAP_KINDS.items():
    torch.library.register_kernel(f"gsa::{_op}", "cuda")(map_cuda(_kind))

# Autograd with respect to x is registered with the op library (the maps are affine in x).
