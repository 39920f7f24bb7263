"""Noise schedules as VE sigmas (docs/math.md section 1): EDM/Karras, discrete VP (DDPM/DDIM timesteps), and
rectified flow. Every schedule is a descending [N + 1] tensor of VE noise levels for an N-step sampler;
the conversions to and from the VP and flow frames are those of `gsa_kernels.frames`.

Schedules are built on the host in float64 and cast at the end, so they are identical on every device.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import frames

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_steps(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return int(n)


def _check_positive(name, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def _finish(values, device, dtype, append_zero: bool) -> torch.Tensor:
    out = torch.as_tensor(values, dtype=torch.float64)
    if append_zero:
        out = torch.cat([out, out.new_zeros(1)])
    return out.to(device=device, dtype=dtype)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """EDM schedule (Karras et al. 2022): n levels linear in sigma^(1/rho) from sigma_max to sigma_min, then 0.

    Returns [n + 1]. Its tail sigmas[k:] is again a Karras schedule (docs/math.md section 4).
    """
    n = _check_steps(n)
    sigma_min, sigma_max, rho = (_check_positive(k, v) for k, v in
                                 (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)))
    if sigma_min > sigma_max:
        raise ValueError(f"sigma_min must be <= sigma_max, got {sigma_min} > {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, device, dtype, True)


def exponential_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, device=None,
                       dtype=torch.float32) -> torch.Tensor:
    """n levels uniform in log sigma from sigma_max to sigma_min, then 0; [n + 1]."""
    n = _check_steps(n)
    sigma_min, sigma_max = _check_positive("sigma_min", sigma_min), _check_positive("sigma_max", sigma_max)
    if sigma_min > sigma_max:
        raise ValueError(f"sigma_min must be <= sigma_max, got {sigma_min} > {sigma_max}")
    return _finish(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp(),
                   device, dtype, True)


# ---------------------------------------------------------------------------------------------
# Discrete VP (DDPM / DDIM) schedules.
def _check_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    if not isinstance(alphas_cumprod, torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 2:
        raise ValueError(f"alphas_cumprod must be a 1-D tensor with >= 2 entries, got shape "
                         f"{tuple(alphas_cumprod.shape)}")
    if not alphas_cumprod.is_floating_point():
        raise TypeError(f"alphas_cumprod must be floating point, got {alphas_cumprod.dtype}")
    if alphas_cumprod.device.type == "cpu" and not bool(((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1]")
    return alphas_cumprod


def vp_train_sigmas(alphas_cumprod) -> torch.Tensor:
    """VE sigma of every training timestep, sqrt((1 - abar_t) / abar_t), increasing in t; [T]."""
    return frames.vp_sigma(_check_alphas_cumprod(alphas_cumprod))


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                          schedule: str = "linear") -> torch.Tensor:
    """alphas_cumprod of the DDPM "linear" or Stable Diffusion "scaled_linear" beta schedule, float64 [T]."""
    n = _check_steps(num_train_timesteps)
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"schedule must be 'linear' or 'scaled_linear', got {schedule!r}")
    return torch.cumprod(1 - betas, 0)


def vp_timesteps(n: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0,
                 device=None) -> torch.Tensor:
    """Integer inference timesteps of DDIM-style schedulers, descending; [n] int64.

    spacing follows diffusers' DDIMScheduler (Lin et al. 2023, table 2): "leading" (DDIM paper),
    "trailing", or "linspace".
    """
    n, t_max = _check_steps(n), _check_steps(num_train_timesteps)
    if n > t_max:
        raise ValueError(f"n must be <= num_train_timesteps = {t_max}, got {n}")
    if spacing == "leading":
        t = torch.arange(n, dtype=torch.float64) * (t_max // n) + steps_offset
    elif spacing == "trailing":
        t = torch.round(torch.arange(t_max, 0, -t_max / n, dtype=torch.float64)).flip(0) - 1
    elif spacing == "linspace":
        t = torch.linspace(0, t_max - 1, n, dtype=torch.float64).round()
    else:
        raise ValueError(f"spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    return t.flip(0).to(torch.int64).to(device)


def vp_sigmas(alphas_cumprod, timesteps, final_sigma: float = 0.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """VE sigmas of descending (possibly fractional) VP timesteps, then `final_sigma`; [len(timesteps) + 1].

    Fractional timesteps interpolate log sigma linearly, like k-diffusion's DiscreteSchedule.
    """
    ts = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
    if ts.numel() < 1:
        raise ValueError("timesteps must hold at least one timestep")
    s = timestep_to_sigma(ts, torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu())
    if ts.numel() > 1 and not bool((s[1:] < s[:-1]).all()):
        raise ValueError("timesteps must be strictly descending")
    return torch.cat([s, s.new_full((1,), float(final_sigma))]).to(device=device, dtype=dtype)


def sigma_to_timestep(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Continuous VP timestep of VE noise level(s) `sigma` (a tensor), by linear interpolation of log sigma
    between training timesteps; clamped to [0, T - 1]. Pure tensor ops: no host synchronisation."""
    log_train = torch.log(frames.vp_sigma(alphas_cumprod.to(device=sigma.device, dtype=torch.float64)))
    ls = torch.log(sigma.to(torch.float64).clamp_min(1e-30))
    hi = torch.searchsorted(log_train, ls).clamp(1, log_train.numel() - 1)
    lo = hi - 1
    w = ((ls - log_train[lo]) / (log_train[hi] - log_train[lo])).clamp(0, 1)
    return (lo + w).to(sigma.dtype if sigma.is_floating_point() else torch.float32)


def timestep_to_sigma(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise level of (possibly fractional) VP timestep(s) t: log sigma interpolated linearly."""
    log_train = torch.log(frames.vp_sigma(alphas_cumprod.to(device=t.device, dtype=torch.float64)))
    tf = t.to(torch.float64).clamp(0, log_train.numel() - 1)
    lo = tf.floor().long().clamp(max=log_train.numel() - 2)
    w = tf - lo
    return torch.exp((1 - w) * log_train[lo] + w * log_train[lo + 1])


# ---------------------------------------------------------------------------------------------
# Rectified flow.
def flow_ts(n: int, t_max: float = 1.0, t_min: float = 0.0, shift: float = 1.0) -> torch.Tensor:
    """Flow times t (x = (1 - t) x0 + t eps) of an n-step rectified-flow sampler, uniform in t from t_max to
    t_min then mapped by the SD3 shift t' = shift t / (1 + (shift - 1) t); [n + 1] float64, ending in t_min."""
    n = _check_steps(n)
    shift = _check_positive("shift", shift)
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min = {t_min}, t_max = {t_max}")
    t = torch.linspace(t_max, t_min, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(n: int, t_max: float = 0.999, t_min: float = 0.0, shift: float = 1.0, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """VE sigmas sigma = t / (1 - t) of `flow_ts`; [n + 1]. t_max must be < 1 (sigma is infinite at t = 1;
    `gsa_kernels.integrations.diffusers` handles a t = 1 start by its exact limit)."""
    if t_max >= 1:
        raise ValueError(f"t_max must be < 1 (sigma = t / (1 - t) is infinite at t = 1), got {t_max}")
    t = flow_ts(n, t_max, t_min, shift)
    return frames.flow_sigma(t).to(device=device, dtype=dtype)


def sigmas_to_frame(sigmas: torch.Tensor, frame: str) -> torch.Tensor:
    """Frame parameter of VE sigmas: sigma ("ve"), alpha_bar ("vp") or t ("flow")."""
    if frame == "ve":
        return sigmas
    if frame == "vp":
        return frames.alpha_bar_from_sigma(sigmas)
    if frame == "flow":
        return frames.t_from_sigma(sigmas)
    raise ValueError(f"frame must be one of {frames.FRAMES}, got {frame!r}")


def frame_to_sigmas(values: torch.Tensor, frame: str) -> torch.Tensor:
    """VE sigmas of frame parameters (inverse of `sigmas_to_frame`)."""
    return frames.frame_sigma_and_scale(frame, values)[0]
