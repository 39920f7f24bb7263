"""torch.ops.gsa mixture ops: thin Python wrappers, fake kernels and CUDA (Triton) kernels.

Schemas (csrc/ops.cpp):
  gsa::gmm_forward(x, log_weights, means, bases?, eigvals?, lam_perp?, sigma, center?, score, return_weights,
                   chunk_size) -> (out, log_z, weights)
  gsa::delta_mixture_forward(x, points, log_weights?, sigma, center?, score, chunk_size) -> (out, log_z)
out is the denoiser D(x; sigma) (or the score when score=True) shaped like x and stored in x's dtype;
log_z [B] = logsumexp_i(log_weights_i + log N_i(x)) with the log-weights as given (unnormalized, so shards
merge exactly); weights [B, K] are the posterior weights (empty unless return_weights). log_z and weights
are float64 if any input is float64, else float32. The CPU kernel is C++ (csrc/mixture_cpu.cpp); the CUDA
kernel is Triton (triton_mixture.py). No autograd: the ops are forward-only.

The Python API below validates (errors name the argument), normalizes the log-weights for log_prob, and
turns numbers into sigma tensors.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _library, config
from .._validation import FLOAT_DTYPES, _reading_values_is_free, as_sigma, check_nonneg, check_tensor

_library.load_library()

try:  # Triton is optional on CPU-only installs.
    from . import triton_mixture
except ImportError:  # pragma: no cover
    triton_mixture = None


class MixtureOutput(NamedTuple):
    out: torch.Tensor          # denoiser or score, shaped like x
    log_prob: torch.Tensor     # log p_sigma(x) [B] (log-weights normalized)
    weights: torch.Tensor | None  # posterior weights [B, K] when asked for


# ----------------------------------------------------------------------------------------------
# Metadata checks shared by the wrappers, the fake kernels and the CUDA kernels (no data reads).
def _check_meta(x, log_weights, means, bases, eigvals, lam_perp, center, means_name="means"):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B, ...] with at least one data dimension, got {tuple(x.shape)}")
    d = math.prod(x.shape[1:])
    check_tensor(means_name, means, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    if means.shape[1] != d:
        raise ValueError(f"{means_name} must have shape [K, d] with d = {d} (from x of shape {tuple(x.shape)}), "
                         f"got {tuple(means.shape)}")
    K = means.shape[0]
    if K == 0:
        raise ValueError(f"{means_name} must hold at least one component (K >= 1), got K = 0")
    if log_weights is not None:
        check_tensor("log_weights", log_weights, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        if log_weights.shape[0] != K:
            raise ValueError(f"log_weights must have shape [K] = [{K}], got {tuple(log_weights.shape)}")
    if (bases is None) != (eigvals is None):
        missing, given = ("eigvals", "bases") if bases is not None else ("bases", "eigvals")
        raise ValueError(f"{missing} must be given with {given}")
    r = 0
    if bases is not None:
        check_tensor("bases", bases, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
        if bases.shape[0] != K or bases.shape[1] != d:
            raise ValueError(f"bases must have shape [K, d, r] = [{K}, {d}, r], got {tuple(bases.shape)}")
        r = bases.shape[2]
        if r > d:
            raise ValueError(f"bases must have r <= d = {d}, got r = {r}")
        check_tensor("eigvals", eigvals, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
        if tuple(eigvals.shape) != (K, r):
            raise ValueError(f"eigvals must have shape [K, r] = [{K}, {r}], got {tuple(eigvals.shape)}")
    if lam_perp is not None:
        check_tensor("lam_perp", lam_perp, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        if lam_perp.shape[0] != K:
            raise ValueError(f"lam_perp must have shape [K] = [{K}], got {tuple(lam_perp.shape)}")
    if center is not None:
        check_tensor("center", center, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        if center.shape[0] != d:
            raise ValueError(f"center must have shape [d] = [{d}], got {tuple(center.shape)}")
    return x.shape[0], d, K, r


def _check_sigma_meta(sigma, x):
    check_tensor("sigma", sigma, dtypes=FLOAT_DTYPES, device=x.device)
    if sigma.dim() > 1 or (sigma.dim() == 1 and sigma.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"sigma must be a scalar or have shape [B] = [{x.shape[0]}], got {tuple(sigma.shape)}")


def compute_dtype(*ts) -> torch.dtype:
    """float64 if any (present) input is float64, else float32: the dtype of log_z and the weights."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def mean_of_rows(t: torch.Tensor, rows_per_step: int = 1 << 16) -> torch.Tensor:
    """Row mean in float64 without a float64 copy of t (chunked): the reference point of the centred
    distance expansion."""
    total = torch.zeros(t.shape[1], dtype=torch.float64, device=t.device)
    for i in range(0, t.shape[0], rows_per_step):
        total += t[i:i + rows_per_step].to(torch.float64).sum(0)
    return total / max(t.shape[0], 1)


# ----------------------------------------------------------------------------------------------
# Fake kernels (shape propagation for torch.compile / meta tensors).
@torch.library.register_fake("gsa::gmm_forward")
def _gmm_fake(x, log_weights, means, bases, eigvals, lam_perp, sigma, center=None, score=False,
              return_weights=False, chunk_size=0):
    B, _, K, _ = _check_meta(x, log_weights, means, bases, eigvals, lam_perp, center)
    _check_sigma_meta(sigma, x)
    ct = compute_dtype(x, log_weights, means, bases, eigvals, lam_perp)
    return (x.new_empty(x.shape), x.new_empty((B,), dtype=ct),
            x.new_empty((B, K) if return_weights else (0,), dtype=ct))


@torch.library.register_fake("gsa::delta_mixture_forward")
def _delta_fake(x, points, log_weights, sigma, center=None, score=False, chunk_size=0):
    B, _, _, _ = _check_meta(x, log_weights, points, None, None, None, center, "points")
    _check_sigma_meta(sigma, x)
    return x.new_empty(x.shape), x.new_empty((B,), dtype=compute_dtype(x, log_weights, points))


# ----------------------------------------------------------------------------------------------
# CUDA kernels (Triton; float64 inputs run the same kernels in float64).
def _need_triton():
    if triton_mixture is None:
        raise RuntimeError("gsa mixture ops on CUDA need triton (pip install triton)")


def _gmm_cuda(x, log_weights, means, bases, eigvals, lam_perp, sigma, center=None, score=False,
              return_weights=False, chunk_size=0):
    B, d, _, r = _check_meta(x, log_weights, means, bases, eigvals, lam_perp, center)
    _check_sigma_meta(sigma, x)
    _need_triton()
    ctr = center if center is not None else mean_of_rows(means)
    out, log_z, w = triton_mixture.gmm_forward(
        x.reshape(B, d), log_weights, means, bases if r > 0 else None, eigvals if r > 0 else None, lam_perp, ctr,
        sigma, score=score, return_weights=return_weights, precision=config.get_precision())
    return out.to(x.dtype).reshape(x.shape), log_z, w


def _delta_cuda(x, points, log_weights, sigma, center=None, score=False, chunk_size=0):
    B, d, _, _ = _check_meta(x, log_weights, points, None, None, None, center, "points")
    _check_sigma_meta(sigma, x)
    _need_triton()
    ctr = center if center is not None else mean_of_rows(points)
    out, log_z = triton_mixture.delta_mixture_forward(x.reshape(B, d), points, log_weights, ctr, sigma, score=score,
                                                      precision=config.get_precision())
    return out.to(x.dtype).reshape(x.shape), log_z


torch.library.register_kernel("gsa::gmm_forward", "cuda")(_gmm_cuda)
torch.library.register_kernel("gsa::delta_mixture_forward", "cuda")(_delta_cuda)


# ----------------------------------------------------------------------------------------------
# Python API.
def check_log_weights(log_weights: torch.Tensor | None) -> None:
    if log_weights is None or not log_weights.numel() or not _reading_values_is_free(log_weights):
        return
    if bool(torch.isnan(log_weights).any()):
        raise ValueError("log_weights has NaN values")
    if bool(torch.isposinf(log_weights).any()):
        raise ValueError("log_weights has +inf values")
    if bool(torch.isneginf(log_weights).all()):
        raise ValueError("log_weights is -inf everywhere: at least one component must have positive weight")


def log_weight_norm(log_weights: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor | float:
    """logsumexp of the log-weights (log n for uniform weights): log p = log_z - this."""
    if log_weights is None:
        return math.log(n)
    return torch.logsumexp(log_weights.to(dtype), dim=0)


def gmm_forward(x, log_weights, means, bases=None, eigvals=None, lam_perp=None, sigma=None, *, score=False,
                return_weights=False, center=None) -> MixtureOutput:
    """GMM denoiser (score=False) or score, log p_sigma(x) and optionally the posterior weights, in one pass.

    log_weights [K] (any normalization; -inf allowed for some), means [K, d], bases [K, d, r] orthonormal
    columns with eigvals [K, r] >= 0 (both None for r = 0), lam_perp [K] >= 0 (None: 0); x [B, ...];
    sigma > 0, a number or a [B] tensor.
    """
    if sigma is None:
        raise TypeError("sigma is required")
    _check_meta(x, log_weights, means, bases, eigvals, lam_perp, center)
    check_tensor("log_weights", log_weights, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_log_weights(log_weights)
    if eigvals is not None:
        check_nonneg("eigvals", eigvals)
    if lam_perp is not None:
        check_nonneg("lam_perp", lam_perp)
    ct = compute_dtype(x, log_weights, means, bases, eigvals, lam_perp)
    s = as_sigma("sigma", sigma, x.shape[0], x.device, dtype=ct)
    out, log_z, w = torch.ops.gsa.gmm_forward(x, log_weights, means, bases, eigvals, lam_perp, s, center,
                                              score, return_weights)
    return MixtureOutput(out, log_z - log_weight_norm(log_weights, means.shape[0], ct), w if return_weights else None)


def gmm_denoise(x, log_weights, means, bases, eigvals, lam_perp, sigma) -> torch.Tensor:
    """GMM posterior mean D(x; sigma) = E[x0 | x] (docs/math.md section 3)."""
    return gmm_forward(x, log_weights, means, bases, eigvals, lam_perp, sigma).out


def gmm_score(x, log_weights, means, bases, eigvals, lam_perp, sigma) -> torch.Tensor:
    """GMM score grad_x log p_sigma(x) = (D - x) / sigma^2."""
    return gmm_forward(x, log_weights, means, bases, eigvals, lam_perp, sigma, score=True).out


def gmm_log_prob(x, log_weights, means, bases, eigvals, lam_perp, sigma) -> torch.Tensor:
    """log p_sigma(x) of the noised GMM with normalized weights, [B]."""
    return gmm_forward(x, log_weights, means, bases, eigvals, lam_perp, sigma).log_prob


def delta_mixture_forward(x, points, log_weights=None, sigma=None, *, score=False, center=None) -> MixtureOutput:
    """Training-set ("delta mixture") denoiser or score and log p_sigma(x) in one pass.

    points [N, d] (float32/float64, or float16/bfloat16 storage; accumulation is float32), log_weights [N]
    or None (uniform). weights are never returned (they would be [B, N]).
    """
    if sigma is None:
        raise TypeError("sigma is required")
    _check_meta(x, log_weights, points, None, None, None, center, "points")
    check_log_weights(log_weights)
    ct = compute_dtype(x, log_weights, points)
    s = as_sigma("sigma", sigma, x.shape[0], x.device, dtype=ct)
    out, log_z = torch.ops.gsa.delta_mixture_forward(x, points, log_weights, s, center, score)
    return MixtureOutput(out, log_z - log_weight_norm(log_weights, points.shape[0], ct), None)


def delta_mixture_denoise(x, points, log_weights, sigma) -> torch.Tensor:
    """D(x; sigma) = sum_i w_i x_i, w = softmax(log pi_i - ||x - x_i||^2 / (2 sigma^2))."""
    return delta_mixture_forward(x, points, log_weights, sigma).out


def delta_mixture_score(x, points, log_weights, sigma) -> torch.Tensor:
    """Exact score of the noised empirical distribution, (D - x) / sigma^2."""
    return delta_mixture_forward(x, points, log_weights, sigma, score=True).out


def delta_mixture_log_prob(x, points, log_weights, sigma) -> torch.Tensor:
    """log p_sigma(x) of the noised empirical distribution, [B]."""
    return delta_mixture_forward(x, points, log_weights, sigma).log_prob
