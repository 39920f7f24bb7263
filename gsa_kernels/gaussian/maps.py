"""The Gaussian maps (docs/math.md section 2.1) as plain PyTorch: the CUDA path for float64 inputs (and
for a missing Triton), and the per-sample maps of the class-conditional family.

    out = [mu] + f(lam_perp) (x - mu) + U [(f(lam) - f(lam_perp)) * U^T (x - mu)]

with basis U [d, r] shared by the batch, or [B, d, r] per sample (the family gathers one per label).
"""
from __future__ import annotations

import torch

from .._core.dtypes import sigma_floor
from .map_kind import DENOISE, SCORE, TELEPORT


def mode_factor(kind: int, lam: torch.Tensor, s_a_sq: torch.Tensor, s_b_sq: torch.Tensor | None = None):
    """f(lam) of the map: lam / (lam + s^2) (denoise), -1 / (lam + s^2) (score),
    sqrt((lam + s_to^2) / (lam + s_from^2)) (teleport; s_a = sigma_from, s_b = sigma_to)."""
    if kind == DENOISE:
        return lam / (lam + s_a_sq)
    if kind == SCORE:
        return -1.0 / (lam + s_a_sq)
    if kind == TELEPORT:
        return torch.sqrt((lam + s_b_sq) / (lam + s_a_sq))
    raise ValueError(f"unknown Gaussian map kind {kind!r}")


def apply_map(kind: int, x2: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, eigvals: torch.Tensor,
              lam_perp: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor | None = None, *,
              full_rank: bool) -> torch.Tensor:
    """The map of x2 [B, d] in x2's dtype. mean [d] or [B, d]; basis [d, r] or [B, d, r]; eigvals [r] or
    [B, r]; lam_perp [] or [B]; s_a, s_b [B]. full_rank: the basis spans R^d, so the f(lam_perp) terms
    are absent (they would only add rounding); a zero-padded basis is not full rank."""
    s_a = s_a.clamp_min(sigma_floor(s_a.dtype))  # sigma^2 stays normal: no 0 / 0 with a zero variance
    s_a_sq = (s_a * s_a).unsqueeze(1)
    s_b_sq = None if s_b is None else (s_b * s_b).unsqueeze(1)
    f_modes = mode_factor(kind, eigvals, s_a_sq, s_b_sq)                        # [B, r]
    xc = x2 - mean
    c = (xc.unsqueeze(1) @ basis).squeeze(1)                                    # U^T (x - mu)   [B, r]
    if full_rank:
        y = ((c * f_modes).unsqueeze(1) @ basis.mT).squeeze(1)
    else:
        f_perp = mode_factor(kind, lam_perp.reshape(-1, 1), s_a_sq, s_b_sq)     # [B, 1] or [1, 1]
        y = f_perp * xc + (((f_modes - f_perp) * c).unsqueeze(1) @ basis.mT).squeeze(1)
    return y if kind == SCORE else y + mean
