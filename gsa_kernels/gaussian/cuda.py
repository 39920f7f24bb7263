"""CUDA kernels of the Gaussian ops, registered with the dispatcher: the Triton kernels
(triton_gaussian.py) for float32 and half storage; float64 inputs (or a missing Triton) take the
unfused PyTorch maps (maps.py). Each kernel runs the one meta check of its arguments (meta.py).
"""
from __future__ import annotations

import torch

from .. import config
from .._core.dtypes import compute_dtype, sigma_floor
from . import maps, meta
from .map_kind import OP_MAP_KINDS, TELEPORT

try:  # Triton is optional: without it, CUDA tensors run the unfused PyTorch path.
    from . import triton_gaussian
except ImportError:  # pragma: no cover
    triton_gaussian = None


def _sigma_vector(sigma, batch, dtype):
    return sigma.to(dtype).reshape(-1).expand(batch).contiguous()


def project_cuda(x, mean, basis):
    batch, d, _ = meta.check_gaussian(x, mean, basis)
    x2 = x.reshape(batch, d)
    ct = compute_dtype(x, mean, basis)
    if triton_gaussian is None or ct == torch.float64:
        return ((x2.to(ct) - mean.to(ct)) @ basis.to(ct)).to(x.dtype)
    c = triton_gaussian.project(x2.contiguous(), mean.float().contiguous(), basis.float().contiguous(),
                                config.get_precision())
    return c.to(x.dtype)


def map_cuda(kind: int):
    """The CUDA kernel of one map (map_kind.DENOISE, SCORE or TELEPORT)."""

    def kernel(x, mean, basis, eigvals, lam_perp, sigma_a, sigma_b=None):
        batch, d, r = meta.check_map(kind, x, mean, basis, eigvals, lam_perp, sigma_a, sigma_b)
        sigma_b = sigma_a if sigma_b is None else sigma_b
        ct = compute_dtype(x, mean, basis, eigvals)
        x2 = x.reshape(batch, d)
        if triton_gaussian is None or ct == torch.float64:
            s_a = _sigma_vector(sigma_a, batch, ct)
            s_b = _sigma_vector(sigma_b, batch, ct) if kind == TELEPORT else None
            out = maps.apply_map(kind, x2.to(ct), mean.to(ct), basis.to(ct), eigvals.to(ct), lam_perp.to(ct),
                                 s_a, s_b, full_rank=r == d)
            return out.to(x.dtype).reshape(x.shape)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        f32 = [t.float().contiguous() for t in (mean, basis, eigvals, lam_perp.reshape(1))]
        # sigma_from floored so that sigma^2 stays normal (no 0 / 0 with a zero variance), as in maps.py.
        s_a = _sigma_vector(sigma_a, batch, torch.float32).clamp_min(sigma_floor(torch.float32))
        triton_gaussian.gaussian_map(kind, x2.contiguous(), *f32, s_a,
                                     _sigma_vector(sigma_b, batch, torch.float32), out.view(batch, d),
                                     config.get_precision())
        return out

    return kernel


torch.library.register_kernel("gsa::project", "cuda")(project_cuda)
for _op, _kind in OP_MAP_KINDS.items():
    torch.library.register_kernel(f"gsa::{_op}", "cuda")(map_cuda(_kind))

# Autograd with respect to x is registered with the op library (the maps are affine in x).
