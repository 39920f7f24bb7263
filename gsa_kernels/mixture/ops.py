"""The Python API of the mixture ops: numbers become tensors, then one torch.ops.gsa call.

Schemas (csrc/ops.cpp):
  gsa::gmm_forward(x, log_weights, means, bases?, eigvals?, lam_perp?, sigma, center?, score, return_weights,
                   chunk_size) -> (out, log_z, weights)
  gsa::delta_mixture_forward(x, points, log_weights?, sigma, center?, score, chunk_size) -> (out, log_z)
out is the denoiser D(x; sigma) (or the score when score=True) shaped like x and stored in x's dtype;
log_z [B] = logsumexp_i(log_weights_i + log N_i(x)) with the log-weights as given (unnormalized, so shards
merge exactly); weights [B, K] are the posterior weights (empty unless return_weights), in the compute
dtype (_core/dtypes.py). log_z is float64 whatever the inputs: |log p| grows like d (about 1e4 nats at
d = 4096), where float32 steps are ~1e-3 nats, coarser than the kernels' accuracy. The CPU kernel is C++; the CUDA kernel is Triton
(cuda.py, triton_mixture.py); meta.py checks the arguments of both the fake and the CUDA kernels.
Differentiable with respect to x (autograd.py: a second streaming pass, gsa::gmm_vjp /
gsa::delta_mixture_vjp).

The raw ops check their own arguments; their errors reach the caller as TypeError / ValueError naming the
argument (_core/errors.py). Values of GPU tensors are read only on request (check_values=True, or
check_values() once: the models do it at construction).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _library
from .._core.cache import cached
from . import autograd as _autograd  # noqa: F401  (registers the backward of the ops)
from .._core.dtypes import compute_dtype
from .._core.errors import call_op
from .._validation import check_nonneg, sigma_arg, values_readable

_library.load_library()

_ROWS_PER_STEP = 1 << 15


class MixtureOutput(NamedTuple):
    out: torch.Tensor          # denoiser or score, shaped like x
    log_prob: torch.Tensor     # log p_sigma(x) [B] (log-weights normalized)
    weights: torch.Tensor | None  # posterior weights [B, K] when asked for


def mean_of_rows(t: torch.Tensor, rows_per_step: int = 1 << 16) -> torch.Tensor:
    """Row mean in float64 without a float64 copy of t (chunked): the reference point of the centred
    distance expansion."""
    total = torch.zeros(t.shape[1], dtype=torch.float64, device=t.device)
    for i in range(0, t.shape[0], rows_per_step):
        total += t[i:i + rows_per_step].to(torch.float64).sum(0)
    return total / max(t.shape[0], 1)


def check_finite_rows(name: str, t: torch.Tensor) -> None:
    """isfinite over a large tensor, a slab of rows at a time (no [N, d] boolean temporary)."""
    if not t.numel() or not values_readable(t):
        return
    flat = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
    for i in range(0, flat.shape[0], _ROWS_PER_STEP):
        if not bool(torch.isfinite(flat[i:i + _ROWS_PER_STEP]).all()):
            raise ValueError(f"{name} has non-finite values (NaN or inf)")


def check_log_weights(log_weights: torch.Tensor | None) -> None:
    """No NaN, no +inf, not -inf everywhere: one reduction (the max is NaN, +inf or -inf exactly then)."""
    if log_weights is None or not log_weights.numel() or not values_readable(log_weights):
        return
    top = float(log_weights.max())
    if math.isnan(top):
        raise ValueError("log_weights has NaN values")
    if top == math.inf:
        raise ValueError("log_weights has +inf values")
    if top == -math.inf:
        raise ValueError("log_weights is -inf everywhere: at least one component must have positive weight")


def check_values(log_weights=None, means=None, bases=None, eigvals=None, lam_perp=None, *,
                 means_name: str = "means") -> None:
    """ValueError naming the first component parameter with a bad value: finite means and bases, eigvals
    and lam_perp finite and >= 0, valid log-weights. Reads the data (a device sync on GPU), unless
    config.validation is off."""
    for name, t in ((means_name, means), ("bases", bases)):
        if t is not None:
            check_finite_rows(name, t)
    for name, t in (("eigvals", eigvals), ("lam_perp", lam_perp)):
        if t is not None:
            check_nonneg(name, t)
    check_log_weights(log_weights)


def log_weight_norm(log_weights: torch.Tensor | None, n: int) -> torch.Tensor | float:
    """logsumexp of the log-weights (log n for uniform weights), in float64 like log_z: log p = log_z - this."""
    if log_weights is None:
        return math.log(n)
    # Once per log-weights tensor (and version): a model's normaliser is not recomputed every call.
    return cached("log_weight_norm", (log_weights,), lambda: torch.logsumexp(log_weights.to(torch.float64), dim=0))


def _on_request(check, x, **params):
    if check and isinstance(x, torch.Tensor) and x.device.type != "cpu":  # the CPU op checks values itself
        check_values(**params)


def gmm_forward(x, log_weights, means, bases=None, eigvals=None, lam_perp=None, sigma=None, *, score=False,
                return_weights=False, center=None, check_values: bool = False) -> MixtureOutput:
    """GMM denoiser (score=False) or score, log p_sigma(x) and optionally the posterior weights, in one pass.

    log_weights [K] (any normalization; -inf allowed for some), means [K, d], bases [K, d, r] orthonormal
    columns with eigvals [K, r] >= 0 (both None for r = 0), lam_perp [K] >= 0 (None: 0); x [B, ...];
    sigma > 0, a number or a [B] tensor.
    """
    if sigma is None:
        raise TypeError("sigma is required")
    _on_request(check_values, x, log_weights=log_weights, eigvals=eigvals, lam_perp=lam_perp)
    ct = compute_dtype(x, log_weights, means, bases, eigvals, lam_perp)
    s = sigma_arg("sigma", sigma, x, dtype=ct, check_values=check_values)
    out, log_z, w = call_op(torch.ops.gsa.gmm_forward, x, log_weights, means, bases, eigvals, lam_perp, s, center,
                            score, return_weights)
    return MixtureOutput(out, log_z - log_weight_norm(log_weights, means.shape[0]), w if return_weights else None)


def gmm_denoise(x, log_weights, means, bases, eigvals, lam_perp, sigma) -> torch.Tensor:
    """GMM posterior mean D(x; sigma) = E[x0 | x] (docs/math.md section 3)."""
    return gmm_forward(x, log_weights, means, bases, eigvals, lam_perp, sigma).out


def gmm_score(x, log_weights, means, bases, eigvals, lam_perp, sigma) -> torch.Tensor:
    """GMM score grad_x log p_sigma(x) = (D - x) / sigma^2."""
    return gmm_forward(x, log_weights, means, bases, eigvals, lam_perp, sigma, score=True).out


def gmm_log_prob(x, log_weights, means, bases, eigvals, lam_perp, sigma) -> torch.Tensor:
    """log p_sigma(x) of the noised GMM with normalized weights, [B]."""
    return gmm_forward(x, log_weights, means, bases, eigvals, lam_perp, sigma).log_prob


def delta_mixture_forward(x, points, log_weights=None, sigma=None, *, score=False, center=None,
                          check_values: bool = False) -> MixtureOutput:
    """Training-set ("delta mixture") denoiser or score and log p_sigma(x) in one pass.

    points [N, d] (float32/float64, or float16/bfloat16 storage; accumulation is float32), log_weights [N]
    or None (uniform). weights are never returned (they would be [B, N]).
    """
    if sigma is None:
        raise TypeError("sigma is required")
    _on_request(check_values, x, log_weights=log_weights)
    ct = compute_dtype(x, log_weights, points)
    s = sigma_arg("sigma", sigma, x, dtype=ct, check_values=check_values)
    out, log_z = call_op(torch.ops.gsa.delta_mixture_forward, x, points, log_weights, s, center, score)
    return MixtureOutput(out, log_z - log_weight_norm(log_weights, points.shape[0]), None)


def delta_mixture_denoise(x, points, log_weights, sigma) -> torch.Tensor:
    """D(x; sigma) = sum_i w_i x_i, w = softmax(log pi_i - ||x - x_i||^2 / (2 sigma^2))."""
    return delta_mixture_forward(x, points, log_weights, sigma).out


def delta_mixture_score(x, points, log_weights, sigma) -> torch.Tensor:
    """Exact score of the noised empirical distribution, (D - x) / sigma^2."""
    return delta_mixture_forward(x, points, log_weights, sigma, score=True).out


def delta_mixture_log_prob(x, points, log_weights, sigma) -> torch.Tensor:
    """log p_sigma(x) of the noised empirical distribution, [B]."""
    return delta_mixture_forward(x, points, log_weights, sigma).log_prob
