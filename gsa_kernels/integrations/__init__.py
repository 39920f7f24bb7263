"""Drop-in use of teleportation from diffusers and k-diffusion.

Neither package is imported here: the functions take the user's scheduler / pipeline / sample_* function.
"""
from . import diffusers, k_diffusion
from .diffusers import pipeline_kwargs, sample_with_scheduler, scheduler_frame, teleport_latents
from .k_diffusion import sample_k_diffusion

__all__ = ["diffusers", "k_diffusion", "teleport_latents", "sample_with_scheduler", "pipeline_kwargs",
           "scheduler_frame", "sample_k_diffusion"]
