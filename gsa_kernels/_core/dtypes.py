"""The one compute-dtype rule of the package.

Every kernel (C++, Triton, the unfused PyTorch paths) computes in float64 if any input is float64, else
in float32: half and bfloat16 are storage types only, accumulated in float32. The same rule picks the
working dtype of a sampler's sigma tensors and of a teleport of half-precision latents.
"""
from __future__ import annotations

import torch


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (None and non-tensor entries are skipped)."""
    for t in tensors:  # a plain loop: this runs on every call of every op
        if getattr(t, "dtype", None) is torch.float64:
            return torch.float64
    return torch.float32


def sigma_floor(dtype: torch.dtype) -> float:
    """The smallest sigma whose square is a normal number of `dtype`'s compute dtype (2^-63 in float32,
    2^-511 in float64). A smaller sigma would make sigma^2 subnormal or 0, and a map with a zero
    variance would form 0 / 0; flooring sigma here changes nothing for any sigma whose square is normal."""
    return float(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny) ** 0.5
