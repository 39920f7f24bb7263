"""Run any k-diffusion sampler (`k_diffusion.sampling.sample_*`) from a teleported start.

    import k_diffusion.sampling as K
    res = sample_k_diffusion(K.sample_dpmpp_2m, model, noise, sigmas, gaussian=g, skip=4)

k-diffusion is not imported here: the caller passes the sample_* function, which is called as
sample_fn(model, x, sigmas[k:], **kwargs) (or, for the adaptive samplers that take sigma_min/sigma_max,
sample_fn(model, x, sigma_min, sigma_start, **kwargs)). Both work in the VE frame, so the teleported x is
passed unchanged; multistep samplers restart their history at the new start by construction.
"""
from __future__ import annotations

import inspect

import torch

from ..sampling import hybrid
from .._core.denoiser import as_denoiser
from .._core.dtypes import compute_dtype
from ..sampling.samplers import SampleResult, schedule_to_host


class _CountingModel:
    """Wraps the k-diffusion model (a denoiser model(x, sigma, **extra_args)) to count its calls."""

    def __init__(self, model):
        self.model = as_denoiser(model, "model")
        self.n_evals = 0

    def __call__(self, x, sigma, **kwargs):
        self.n_evals += 1
        return self.model(x, sigma, **kwargs)


def sample_k_diffusion(sample_fn, model, noise: torch.Tensor, sigmas=None, gaussian=None, skip: int = 0,
                       sigma_skip: float | None = None, sigma_min: float | None = None,
                       sigma_max: float | None = None, **sampler_kwargs) -> SampleResult:
    """Teleport x_init = sigma_max * noise with `gaussian` and finish with a k-diffusion sampler.

    sample_fn: a k_diffusion.sampling.sample_* function. model: the k-diffusion denoiser model(x, sigma)
    (or a GaussianModel/GMM: its .denoise is used). Schedule-based samplers (sample_euler, sample_heun,
    sample_dpmpp_2m, ...) take `sigmas` and skip=k or sigma_skip as in gsa_kernels.sampling.sample; the
    adaptive ones (sample_dpm_fast, sample_dpm_adaptive) take sigma_min, sigma_max and sigma_skip.
    sampler_kwargs go to sample_fn (extra_args=..., eta=..., n=...); the progress bar is disabled unless
    `disable` is given. Returns SampleResult(x, n_evals, sigma_start).
    """
    if not callable(sample_fn):
        raise TypeError(f"sample_fn must be a k_diffusion.sampling.sample_* function, got {type(sample_fn).__name__}")
    params = inspect.signature(sample_fn).parameters
    counting = _CountingModel(model)
    if "disable" in params:
        sampler_kwargs.setdefault("disable", True)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor [B, ...]")
    if "sigmas" in params:
        if sigmas is None:
            raise ValueError(f"{sample_fn.__name__} takes a schedule: pass sigmas=")
        sig = schedule_to_host(sigmas)
        k = hybrid.resolve_skip(sig, skip=skip, sigma_skip=sigma_skip, gaussian=gaussian)
        x = hybrid.teleport_start(gaussian, noise, sig, k)
        if isinstance(sigmas, torch.Tensor):
            tail = sigmas[k:]
        else:
            tail = torch.tensor(sig[k:], dtype=compute_dtype(noise), device=noise.device)
        if k < len(sig) - 1:
            x = sample_fn(counting, x, tail, **sampler_kwargs)
        return SampleResult(x=x, n_evals=counting.n_evals, sigma_start=sig[k])
    if "sigma_min" in params and "sigma_max" in params:
        if sigma_min is None or sigma_max is None:
            raise ValueError(f"{sample_fn.__name__} takes sigma_min and sigma_max: pass both")
        if skip:
            raise ValueError(f"{sample_fn.__name__} has no schedule to skip steps of: pass sigma_skip instead")
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        start = sigma_max if sigma_skip is None else min(max(float(sigma_skip), sigma_min), sigma_max)
        if start < sigma_max and gaussian is None:
            raise ValueError("teleporting (sigma_skip) needs a gaussian model")
        x = hybrid.teleport_start(gaussian, noise, [sigma_max, start], 1 if start < sigma_max else 0)
        x = sample_fn(counting, x, sigma_min, start, **sampler_kwargs)
        if isinstance(x, tuple):  # sample_dpm_adaptive(return_info=True)
            x = x[0]
        return SampleResult(x=x, n_evals=counting.n_evals, sigma_start=start)
    raise TypeError(f"{getattr(sample_fn, '__name__', sample_fn)} takes neither sigmas nor sigma_min/sigma_max")
