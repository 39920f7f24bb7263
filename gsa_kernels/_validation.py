"""Argument checks for the Python API: each error names the argument it is about."""
from __future__ import annotations

import numbers

import torch

from . import config

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
PARAM_DTYPES = (torch.float32, torch.float64)


def _reading_values_is_free(t: torch.Tensor) -> bool:
    """Value checks sync a GPU; skip them where a sync is forbidden or unwanted."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    if not config.validation_enabled():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and _reading_values_is_free(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite values (NaN or inf)")


def check_nonneg(name: str, t: torch.Tensor) -> None:
    check_finite(name, t)
    if t.numel() and _reading_values_is_free(t) and bool((t < 0).any()):
        raise ValueError(f"{name} has negative values; variances must be >= 0")


def as_sigma(name: str, sigma, batch: int, device, *, dtype=torch.float32, allow_zero: bool = False) -> torch.Tensor:
    """A Python number or a [] / [B] tensor -> a [B] tensor on `device`, checked without a GPU sync where possible."""
    if isinstance(sigma, bool):
        raise TypeError(f"{name} must be a number or a tensor, got bool")
    if isinstance(sigma, numbers.Real):
        s = float(sigma)
        if not s == s or s in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {s}")
        if s < 0 or (s == 0 and not allow_zero):
            raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {s}")
        return torch.full((batch,), s, dtype=dtype, device=device)
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"{name} must be a number or a tensor, got {type(sigma).__name__}")
    if sigma.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {sigma.dtype}")
    if sigma.device != torch.device(device):
        raise ValueError(f"{name} is on {sigma.device} but x is on {device}")
    if sigma.dim() > 1 or (sigma.dim() == 1 and sigma.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be a scalar or have shape [B] = [{batch}], got {tuple(sigma.shape)}")
    if sigma.numel() and _reading_values_is_free(sigma):
        if not bool(torch.isfinite(sigma).all()):
            raise ValueError(f"{name} has non-finite values (NaN or inf)")
        bad = (sigma < 0) if allow_zero else (sigma <= 0)
        if bool(bad.any()):
            raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}")
    return sigma.reshape(-1).expand(batch) if sigma.numel() == 1 else sigma
