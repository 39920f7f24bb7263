"""Samplers with analytical teleportation (docs/math.md section 4) on the k-diffusion denoiser convention.

    from gsa_kernels.sampling import karras_sigmas, sample
    res = sample(denoiser, noise, karras_sigmas(18), method="heun", gaussian=g, skip=4)
    res.x, res.n_evals, res.sigma_start
"""
from .adapters import FlowDenoiser, VPDenoiser, network_output
from .family import GaussianFamily, LabeledGaussians
from .hybrid import SigmaSkipChoice, choose_sigma_skip, pooled_explained_variance, resolve_skip, teleport_start
from .samplers import METHODS, SampleResult, as_denoiser, evals_per_run, sample, schedule_to_host
from .schedules import (exponential_sigmas, flow_sigmas, flow_ts, frame_to_sigmas, karras_sigmas,
                        linear_alphas_cumprod, sigma_to_timestep, sigmas_to_frame, timestep_to_sigma, vp_sigmas,
                        vp_timesteps, vp_train_sigmas)

__all__ = [
    "METHODS", "SampleResult", "sample", "as_denoiser", "evals_per_run", "schedule_to_host",
    "karras_sigmas", "exponential_sigmas", "vp_sigmas", "vp_timesteps", "vp_train_sigmas", "linear_alphas_cumprod",
    "sigma_to_timestep", "timestep_to_sigma", "flow_ts", "flow_sigmas", "sigmas_to_frame", "frame_to_sigmas",
    "resolve_skip", "teleport_start", "choose_sigma_skip", "pooled_explained_variance", "SigmaSkipChoice",
    "GaussianFamily", "LabeledGaussians", "VPDenoiser", "FlowDenoiser", "network_output",
]
