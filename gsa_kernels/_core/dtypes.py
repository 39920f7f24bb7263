"""The one compute-dtype rule of the package.

Every kernel (C++, Triton, the unfused PyTorch paths) computes in float64 if any input is float64, else
in float32: half and bfloat16 are storage types only, accumulated in float32. The same rule picks the
working dtype of a sampler's sigma tensors and of a teleport of half-precision latents.
"""
from __future__ import annotations

import torch


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (None and non-tensor entries are skipped)."""
    return torch.float64 if any(getattr(t, "dtype", None) == torch.float64 for t in tensors) else torch.float32
