"""CUDA kernels of the mixture ops, registered with the dispatcher: the Triton kernels of
triton_mixture.py and, for the VJP ops, triton_mixture_vjp.py (float64 inputs run the same kernels in
float64). Each kernel runs the one meta check of its arguments (meta.py).
"""
from __future__ import annotations

import torch

from .. import config
from .._core.cache import cached
from .._validation import check_finite, check_nonneg, values_readable
from . import meta
from .ops import check_log_weights, mean_of_rows

try:  # Triton is optional on CPU-only installs.
    from . import triton_mixture, triton_mixture_vjp
except ImportError:  # pragma: no cover
    triton_mixture = triton_mixture_vjp = None


def _need_triton():
    if triton_mixture is None:
        raise RuntimeError("gsa mixture ops on CUDA need triton (pip install triton)")


def _rows(x, B, d):
    """x as [B, d] (a view op only when x has more than one data dimension)."""
    return x if x.dim() == 2 else x.reshape(B, d)


def _as_x(out, x):
    """The kernel's [B, d] output in x's dtype and shape (no op when they already match)."""
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(x.shape)


def _center(center, points):
    """The given centre, or the mean of the points: computed once per points tensor (and version)."""
    if center is not None:
        return center
    return cached("mean_of_rows", (points,), lambda: mean_of_rows(points))


def _check_values(log_weights, eigvals, lam_perp, center) -> bool:
    if log_weights is not None:
        check_log_weights(log_weights)
    for name, t in (("eigvals", eigvals), ("lam_perp", lam_perp)):
        if t is not None:
            check_nonneg(name, t)
    if center is not None:
        check_finite("center", center)
    return True


def _check_values_once(log_weights, eigvals=None, lam_perp=None, center=None) -> None:
    """What the CPU op rejects by value (NaN / +inf / all -inf log-weights, negative or non-finite
    variances, a non-finite centre), checked on the first call with each set of parameter tensors and then
    never again while they are unchanged (one cache entry keyed on their version counters): one device sync
    per new parameter set, none per call. Skipped where values are not readable (config.validation off,
    torch.compile, CUDA-graph capture); sigma is checked by the public functions (numbers) or on request."""
    sources = [t for t in (log_weights, eigvals, lam_perp, center) if t is not None]
    if not sources or not values_readable(sources[0]):
        return
    # The tag tells which argument each source is (a tensor checked as one is not checked as another).
    tag = ("values checked", log_weights is not None, eigvals is not None, lam_perp is not None)
    cached(tag, sources, lambda: _check_values(log_weights, eigvals, lam_perp, center))


def gmm_forward_cuda(x, log_weights, means, bases, eigvals, lam_perp, sigma, center=None, score=False,
                     return_weights=False, chunk_size=0):
    B, d, _, r = meta.check_mixture(x, log_weights, means, bases, eigvals, lam_perp, sigma, center)
    _need_triton()
    _check_values_once(log_weights, eigvals, lam_perp, center)
    out, log_z, w = triton_mixture.gmm_forward(
        _rows(x, B, d), log_weights, means, bases if r > 0 else None, eigvals if r > 0 else None, lam_perp,
        _center(center, means), sigma, score=score, return_weights=return_weights,
        precision=config.kernel_precision(x.device))
    return _as_x(out, x), log_z, w


def delta_mixture_forward_cuda(x, points, log_weights, sigma, center=None, score=False, chunk_size=0):
    B, d, _, _ = meta.check_mixture(x, log_weights, points, None, None, None, sigma, center, "points")
    _need_triton()
    _check_values_once(log_weights, center=center)
    out, log_z = triton_mixture.delta_mixture_forward(_rows(x, B, d), points, log_weights, _center(center, points),
                                                      sigma, score=score, precision=config.kernel_precision(x.device))
    return _as_x(out, x), log_z


torch.library.register_kernel("gsa::gmm_forward", "cuda")(gmm_forward_cuda)
torch.library.register_kernel("gsa::delta_mixture_forward", "cuda")(delta_mixture_forward_cuda)


# The VJP ops on CUDA: one more streaming pass (triton_mixture_vjp.py), memory flat in K.
def gmm_vjp_cuda(x, log_weights, means, bases, eigvals, lam_perp, sigma, frame, v, center=None, chunk_size=0):
    B, d, _, r = meta.check_mixture(x, log_weights, means, bases, eigvals, lam_perp, sigma, center)
    meta.check_vjp_operands(x, frame, v)
    _need_triton()
    _check_values_once(log_weights, eigvals, lam_perp, center)
    out = triton_mixture_vjp.gmm_vjp(
        _rows(x, B, d), log_weights, means, bases if r > 0 else None, eigvals if r > 0 else None, lam_perp, sigma,
        _rows(frame, B, d), _rows(v, B, d), precision=config.kernel_precision(x.device))
    return _as_x(out, x)


def delta_mixture_vjp_cuda(x, points, log_weights, sigma, frame, v, center=None, chunk_size=0):
    B, d, _, _ = meta.check_mixture(x, log_weights, points, None, None, None, sigma, center, "points")
    meta.check_vjp_operands(x, frame, v)
    _need_triton()
    _check_values_once(log_weights, center=center)
    out = triton_mixture_vjp.delta_mixture_vjp(_rows(x, B, d), points, log_weights, sigma,
                                               _rows(frame, B, d), _rows(v, B, d),
                                               precision=config.kernel_precision(x.device))
    return _as_x(out, x)


torch.library.register_kernel("gsa::gmm_vjp", "cuda")(gmm_vjp_cuda)
torch.library.register_kernel("gsa::delta_mixture_vjp", "cuda")(delta_mixture_vjp_cuda)
