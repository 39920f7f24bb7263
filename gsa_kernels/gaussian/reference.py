"""Float64-capable pure-PyTorch reference of the Gaussian ops, following docs/math.md section 2 line by line.

It is the oracle every kernel is tested against: no fusion, no special cases beyond the formulas.
All functions take x of shape [B, ...] and return the input shape; sigma is a number or a [B] tensor.
"""
from __future__ import annotations

import torch


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _sigma_column(sigma, x2: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x2.dtype, device=x2.device)
    return s.reshape(-1, 1).expand(x2.shape[0], 1)


def project(x, mean, basis):
    """c = U^T (x - mu), shape [B, r]."""
    return (_flat(x) - mean) @ basis


def apply_mode_function(x, mean, basis, f_modes, f_perp):
    """L_f(x) = f(lam_perp) (x - mu) + U [(f(lam) - f(lam_perp)) * c]   (docs/math.md section 2.1), flattened [B, d].

    f_modes: [B, r] (or [r]); f_perp: [B, 1] (or scalar). With r = d the orthogonal complement is empty,
    so the f(lam_perp) terms are absent (they cancel exactly in exact arithmetic).
    """
    x2 = _flat(x)
    xc = x2 - mean
    c = xc @ basis
    d, r = basis.shape
    if r == d:
        return c * f_modes @ basis.T
    return f_perp * xc + ((f_modes - f_perp) * c) @ basis.T


# The per-mode functions f(l) of docs/math.md section 2.1 (s2 = sigma^2).
def f_denoise(lam, s2):
    return lam / (lam + s2)


def f_score(lam, s2):
    return -1.0 / (lam + s2)


def f_teleport(lam, s0_sq, s1_sq):
    return torch.sqrt((lam + s1_sq) / (lam + s0_sq))


def gaussian_denoise(x, mean, basis, eigvals, lam_perp, sigma):
    """D(x; sigma) = mu + L_f(x) with f(l) = l / (l + sigma^2)."""
    x2 = _flat(x)
    s2 = _sigma_column(sigma, x2) ** 2
    lp = torch.as_tensor(lam_perp, dtype=x2.dtype, device=x2.device)
    out = mean + apply_mode_function(x2, mean, basis, f_denoise(eigvals, s2), f_denoise(lp, s2))
    return out.reshape(x.shape)


def gaussian_score(x, mean, basis, eigvals, lam_perp, sigma):
    """grad log p_sigma(x) = L_f(x) with f(l) = -1 / (l + sigma^2)."""
    x2 = _flat(x)
    s2 = _sigma_column(sigma, x2) ** 2
    lp = torch.as_tensor(lam_perp, dtype=x2.dtype, device=x2.device)
    out = apply_mode_function(x2, mean, basis, f_score(eigvals, s2), f_score(lp, s2))
    return out.reshape(x.shape)


def teleport(x, mean, basis, eigvals, lam_perp, sigma_from, sigma_to):
    """Exact PF-ODE solution from sigma_from to sigma_to: mu + L_f(x), f(l) = sqrt((l + s1^2) / (l + s0^2))."""
    x2 = _flat(x)
    s0 = _sigma_column(sigma_from, x2) ** 2
    s1 = _sigma_column(sigma_to, x2) ** 2
    lp = torch.as_tensor(lam_perp, dtype=x2.dtype, device=x2.device)
    out = mean + apply_mode_function(x2, mean, basis, f_teleport(eigvals, s0, s1), f_teleport(lp, s0, s1))
    return out.reshape(x.shape)


def denoise_along_teleport(x, mean, basis, eigvals, lam_perp, sigma_from, sigma):
    """docs/math.md section 2.2: D(x(sigma); sigma) where x(sigma) = teleport(x, sigma_from, sigma)."""
    xs = teleport(x, mean, basis, eigvals, lam_perp, sigma_from, sigma)
    return gaussian_denoise(xs, mean, basis, eigvals, lam_perp, sigma)


def gaussian_log_prob(x, mean, basis, eigvals, lam_perp, sigma):
    """log N(x; mu, C(sigma)) with C(sigma) = U diag(lam + s^2) U^T + (lam_perp + s^2)(I - U U^T)."""
    x2 = _flat(x)
    d, r = basis.shape
    s2 = _sigma_column(sigma, x2) ** 2
    lp = torch.as_tensor(lam_perp, dtype=x2.dtype, device=x2.device)
    xc = x2 - mean
    c = xc @ basis
    q = (xc * xc).sum(1, keepdim=True)
    p = (c * c).sum(1, keepdim=True)
    maha = (c * c / (eigvals + s2)).sum(1, keepdim=True)
    logdet = torch.log(eigvals + s2).sum(1, keepdim=True)
    if r < d:
        maha = maha + (q - p) / (lp + s2)
        logdet = logdet + (d - r) * torch.log(lp + s2)
    return (-0.5 * (maha + logdet + d * torch.log(torch.tensor(2 * torch.pi, dtype=x2.dtype)))).squeeze(1)
