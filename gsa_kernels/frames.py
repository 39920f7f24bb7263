"""Noise frames (docs/math.md section 1). Every op works in the VE/EDM frame x = x0 + sigma * eps; a frame
is a map (scale s, noise level sigma) with x_frame = s * x_ve.

| frame | parameter           | sigma                      | scale s         |
|-------|---------------------|----------------------------|-----------------|
| ve    | sigma               | sigma                      | 1               |
| vp    | alpha_bar in (0, 1] | sqrt((1 - abar) / abar)    | sqrt(abar)      |
| flow  | t in [0, 1)         | t / (1 - t)                | 1 - t           |
"""
from __future__ import annotations

import math
import numbers

import torch

FRAMES = ("ve", "vp", "flow")


def _sqrt(v):
    return math.sqrt(v) if isinstance(v, numbers.Real) else torch.sqrt(v)


def _check_range(name, v, lo, hi, lo_open, hi_open):
    if isinstance(v, numbers.Real):
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v}")
    elif isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.numel():
        ok = ((v > lo) if lo_open else (v >= lo)) & ((v < hi) if hi_open else (v <= hi))
        if not bool(ok.all()):
            raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def vp_sigma(alpha_bar):
    """VE noise level of a VP sample with cumulative alpha `alpha_bar`."""
    _check_range("alpha_bar", alpha_bar, 0.0, 1.0, True, False)
    return _sqrt((1 - alpha_bar) / alpha_bar)


def vp_scale(alpha_bar):
    _check_range("alpha_bar", alpha_bar, 0.0, 1.0, True, False)
    return _sqrt(alpha_bar)


def alpha_bar_from_sigma(sigma):
    """Inverse of vp_sigma: abar = 1 / (1 + sigma^2)."""
    return 1.0 / (1.0 + sigma * sigma)


def flow_sigma(t):
    """VE noise level of a rectified-flow sample x = (1 - t) x0 + t eps."""
    _check_range("t", t, 0.0, 1.0, False, True)
    return t / (1 - t)


def flow_scale(t):
    _check_range("t", t, 0.0, 1.0, False, True)
    return 1 - t


def t_from_sigma(sigma):
    """Inverse of flow_sigma: t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def frame_sigma_and_scale(frame: str, value):
    """(sigma, scale) of a frame parameter: sigma (ve), alpha_bar (vp) or t (flow)."""
    if frame == "ve":
        return value, 1.0
    if frame == "vp":
        return vp_sigma(value), vp_scale(value)
    if frame == "flow":
        return flow_sigma(value), flow_scale(value)
    raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")


def _per_sample(scale, x: torch.Tensor):
    if isinstance(scale, torch.Tensor) and scale.dim() == 1 and scale.numel() == x.shape[0] and x.dim() > 1:
        return scale.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    return scale


def to_ve(x: torch.Tensor, scale) -> torch.Tensor:
    """x_ve = x / s (s a number or a [B] tensor)."""
    return x / _per_sample(scale, x)


def from_ve(x_ve: torch.Tensor, scale) -> torch.Tensor:
    """x = s * x_ve."""
    return x_ve * _per_sample(scale, x_ve)
