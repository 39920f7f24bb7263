"""Float64-capable pure-PyTorch reference of the mixture ops, following docs/math.md section 3 line by line.

It is the oracle every mixture kernel is tested against. It materializes [B, K, d] tensors on purpose
(no chunking, no centring, no online softmax): small shapes only.

Conventions shared with the ops:
- x is [B, ...] with prod(...) = d; sigma is a number or a [B] tensor.
- log_weights are the log pi_i *as given* (not necessarily normalized). `log_z` is
  log sum_i exp(log pi_i + log N_i(x)); the normalized log-density is
  log p_sigma(x) = log_z - logsumexp(log pi). The posterior weights and D do not depend on the
  normalization.
- bases [K, d, r] hold orthonormal columns per component; r = 0 (bases=None) is the isotropic case.
  With r = d there is no orthogonal complement, so the lam_perp terms are absent (as for the Gaussian ops).
"""
from __future__ import annotations

import math

import torch


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _sigma_sq(sigma, x2: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x2.dtype, device=x2.device)
    return (s.reshape(-1, 1).expand(x2.shape[0], 1)) ** 2  # [B, 1]


def _parts(means, bases, eigvals, lam_perp):
    K, d = means.shape
    if bases is None:
        bases = means.new_zeros((K, d, 0))
        eigvals = means.new_zeros((K, 0))
    if lam_perp is None:
        lam_perp = means.new_zeros((K,))
    return bases, eigvals, lam_perp


def component_log_density(x, means, bases, eigvals, lam_perp, sigma):
    """log N_i(x; mu_i, C_i(sigma)) for every component, [B, K]   (docs/math.md section 3)."""
    x2 = _flat(x)
    bases, eigvals, lam_perp = _parts(means, bases, eigvals, lam_perp)
    K, d, r = bases.shape
    s2 = _sigma_sq(sigma, x2)[:, :, None]                      # [B, 1, 1]
    xc = x2[:, None, :] - means[None, :, :]                     # x - mu_i          [B, K, d]
    c = torch.einsum("bkd,kdr->bkr", xc, bases)                 # c_i = U_i^T (x - mu_i)
    q = (xc * xc).sum(-1)                                       # q_i = ||x - mu_i||^2
    p = (c * c).sum(-1)                                         # p_i = ||c_i||^2
    lam = eigvals[None, :, :] + s2                              # lam_ik + sigma^2  [B, K, r]
    maha = (c * c / lam).sum(-1)
    logdet = torch.log(lam).sum(-1)
    if r < d:
        lp = lam_perp[None, :] + s2[:, :, 0]                    # lam_perp_i + sigma^2
        maha = maha + (q - p) / lp
        logdet = logdet + (d - r) * torch.log(lp)
    return -0.5 * (maha + logdet + d * math.log(2 * math.pi))


def gmm_posterior(x, log_weights, means, bases, eigvals, lam_perp, sigma):
    """(w [B, K], log_z [B]) with w_i = softmax_i(log pi_i + log N_i) and log_z its log-sum-exp."""
    logits = log_weights[None, :] + component_log_density(x, means, bases, eigvals, lam_perp, sigma)
    log_z = torch.logsumexp(logits, dim=1)
    return torch.softmax(logits, dim=1), log_z


def gmm_denoise(x, log_weights, means, bases, eigvals, lam_perp, sigma):
    """D(x; sigma) = sum_i w_i [mu_i + a_i (x - mu_i) + U_i((b_i - a_i) * c_i)]   (docs/math.md section 3)."""
    x2 = _flat(x)
    w, _ = gmm_posterior(x2, log_weights, means, bases, eigvals, lam_perp, sigma)
    bases, eigvals, lam_perp = _parts(means, bases, eigvals, lam_perp)
    K, d, r = bases.shape
    s2 = _sigma_sq(sigma, x2)                                   # [B, 1]
    xc = x2[:, None, :] - means[None, :, :]                     # [B, K, d]
    c = torch.einsum("bkd,kdr->bkr", xc, bases)
    a = lam_perp[None, :] / (lam_perp[None, :] + s2)            # a_i   [B, K]
    if r == d:
        a = torch.zeros_like(a)
    b = eigvals[None, :, :] / (eigvals[None, :, :] + s2[:, :, None])  # b_ik  [B, K, r]
    d_i = means[None] + a[:, :, None] * xc + torch.einsum("kdr,bkr->bkd", bases, (b - a[:, :, None]) * c)
    return (w[:, :, None] * d_i).sum(1).reshape(x.shape)


def gmm_score(x, log_weights, means, bases, eigvals, lam_perp, sigma):
    """score(x; sigma) = (D(x; sigma) - x) / sigma^2."""
    s2 = _sigma_sq(sigma, _flat(x))
    d = gmm_denoise(x, log_weights, means, bases, eigvals, lam_perp, sigma)
    return ((_flat(d) - _flat(x)) / s2).reshape(x.shape)


def gmm_log_prob(x, log_weights, means, bases, eigvals, lam_perp, sigma):
    """log p_sigma(x) = logsumexp_i(log pi_i + log N_i) with pi normalized, [B]."""
    _, log_z = gmm_posterior(x, log_weights, means, bases, eigvals, lam_perp, sigma)
    return log_z - torch.logsumexp(log_weights, dim=0)


# ---------------------------------------------------------------------------------------------
# The delta mixture (docs/math.md section 3, special case): r = 0, lam_perp = 0, mu_i = x_i.
def _uniform(points):
    return points.new_zeros(points.shape[0])


def delta_mixture_posterior(x, points, log_weights, sigma):
    """(w [B, N], log_z [B]): w = softmax_i(log pi_i - ||x - x_i||^2 / (2 sigma^2)); log_z includes the
    Gaussian normalizer -d/2 log(2 pi sigma^2)."""
    x2 = _flat(x)
    lw = _uniform(points) if log_weights is None else log_weights
    d = x2.shape[1]
    s2 = _sigma_sq(sigma, x2)
    dist2 = ((x2[:, None, :] - points[None, :, :]) ** 2).sum(-1)  # [B, N]
    logits = lw[None, :] - dist2 / (2 * s2) - 0.5 * d * torch.log(2 * math.pi * s2)
    return torch.softmax(logits, dim=1), torch.logsumexp(logits, dim=1)


def delta_mixture_denoise(x, points, log_weights, sigma):
    """D(x) = sum_i w_i x_i: one mean-shift step with a Gaussian kernel of bandwidth sigma."""
    w, _ = delta_mixture_posterior(x, points, log_weights, sigma)
    return (w @ points).reshape(x.shape)


def delta_mixture_score(x, points, log_weights, sigma):
    s2 = _sigma_sq(sigma, _flat(x))
    d = delta_mixture_denoise(x, points, log_weights, sigma)
    return ((_flat(d) - _flat(x)) / s2).reshape(x.shape)


def delta_mixture_log_prob(x, points, log_weights, sigma):
    """log p_sigma(x) of the noised empirical distribution (weights normalized), [B]."""
    _, log_z = delta_mixture_posterior(x, points, log_weights, sigma)
    lw = _uniform(points) if log_weights is None else log_weights
    return log_z - torch.logsumexp(lw, dim=0)
