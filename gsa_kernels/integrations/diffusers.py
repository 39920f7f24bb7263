"""Teleported starts for diffusers schedulers and pipelines (docs/math.md sections 1 and 4).

A diffusers scheduler keeps its sample in one of three frames (docs/math.md section 1):

| frame | schedulers | sample at step i | VE noise level |
|---|---|---|---|
| ve   | EulerDiscrete, Heun, LMS, KDPM2, EDMEuler (init_noise_sigma > 1) | x0 + sigma_i eps | sigmas[i] |
| vp   | DDIM, DDPM, PNDM (alphas_cumprod[t]); DPMSolverMultistep, UniPC, DEIS (sigmas) | sqrt(abar) x0 + sqrt(1-abar) eps | sqrt((1-abar)/abar) |
| flow | FlowMatchEulerDiscrete, FlowMatchHeun, use_flow_sigmas=True | (1-t) x0 + t eps | t / (1 - t) |

`teleport_latents` maps the scheduler's own initial latents (noise * init_noise_sigma at timesteps[0]) to
the VE frame, teleports them with the Gaussian to the level of timesteps[k], maps back, and calls
`set_begin_index` so the scheduler's step counter starts at k (multistep history starts empty there).
A flow start at t = 1 (pure noise, sigma = inf) is handled by its limit (a teleport from sigma = 1e6,
exact to about 1e-6).

- `sample_with_scheduler`: the whole loop (scale_model_input, network, step) from the teleported start.
- `pipeline_kwargs`: `latents=` plus `timesteps=` or `sigmas=` (the tail of the schedule) for pipelines
  that accept them; the tail is checked against the full schedule on a copy of the scheduler.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import torch

from ..sampling import hybrid
from ..sampling.adapters import network_output
from ..sampling.samplers import SampleResult

_SIGMA_AT_T1 = 1e6  # stands in for sigma = inf at flow time t = 1; the teleport's O(1/sigma) terms vanish


def _config(scheduler) -> dict:
    cfg = getattr(scheduler, "config", None)
    if cfg is None:
        raise TypeError(f"scheduler must be a diffusers scheduler (with .config), got {type(scheduler).__name__}")
    return cfg


def scheduler_frame(scheduler) -> str:
    """"ve", "vp" or "flow": the frame of the scheduler's samples (see the module table)."""
    cfg = _config(scheduler)
    if type(scheduler).__name__.startswith("FlowMatch") or cfg.get("use_flow_sigmas", False):
        return "flow"
    if getattr(scheduler, "sigmas", None) is not None and float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0:
        return "ve"
    return "vp"


def _check_ready(scheduler):
    if getattr(scheduler, "timesteps", None) is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(...) first (or pass num_inference_steps=)")


def scheduler_noise_level(scheduler, index: int, frame: str | None = None) -> tuple[float, float]:
    """(VE sigma, scale) of the scheduler's sample at timestep index `index`: x_sample = scale * x_ve.
    Host floats from the scheduler's (CPU) schedule."""
    frame = frame or scheduler_frame(scheduler)
    sigmas = getattr(scheduler, "sigmas", None)
    if frame == "flow":
        t = float(sigmas[index])
        return (t / (1 - t) if t < 1 else math.inf), 1.0 - t
    if frame == "ve":
        return float(sigmas[index]), 1.0
    if frame != "vp":
        raise ValueError(f"frame must be 've', 'vp' or 'flow', got {frame!r}")
    if sigmas is not None:
        s = float(sigmas[index])
        return s, 1.0 / math.sqrt(1.0 + s * s)
    if index >= len(scheduler.timesteps):
        return 0.0, 1.0  # DDIM-style schedulers end on the clean sample
    abar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[index])])
    return math.sqrt((1 - abar) / abar), math.sqrt(abar)


def _step_indices(scheduler) -> list[int]:
    """Timestep index of each solver step (second-order schedulers such as Heun repeat timesteps)."""
    order = int(getattr(scheduler, "order", 1))
    return list(range(0, len(scheduler.timesteps), order))


@dataclass
class TeleportedLatents:
    """latents: the scheduler-frame sample at timesteps[begin_index]; timesteps: the timesteps still to run;
    skip: solver steps skipped; sigma: VE noise level of the start; n_steps: solver steps of the full run."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    begin_index: int
    skip: int
    sigma: float
    n_steps: int


def _teleport_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def teleport_latents(scheduler, gaussian, noise: torch.Tensor, skip: int = 0, sigma_skip: float | None = None,
                     frame: str | None = None, set_begin_index: bool = True) -> TeleportedLatents:
    """Teleport the scheduler's initial latents (noise * init_noise_sigma) over its first `skip` steps
    (or down to the lowest step level at or above `sigma_skip`). Call after scheduler.set_timesteps().

    noise: standard normal [B, ...] in the latent shape. gaussian: GaussianModel over prod(latent shape[1:])
    (or GaussianFamily.for_labels(labels)), fitted to VE-frame clean latents. frame overrides
    `scheduler_frame`. With set_begin_index the scheduler is told to start at the skipped-to index.
    """
    _check_ready(scheduler)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor [B, ...]")
    frame = frame or scheduler_frame(scheduler)
    idx = _step_indices(scheduler)
    levels = [scheduler_noise_level(scheduler, i, frame) for i in idx]
    sig = [s for s, _ in levels] + [0.0]
    # sigma = inf at a flow start t = 1 only matters for the teleport; resolve_skip needs finite levels
    finite_sig = [min(s, _SIGMA_AT_T1) for s in sig]
    if any(b >= a for a, b in zip(finite_sig, finite_sig[1:])):
        raise ValueError(f"{type(scheduler).__name__} has a noise schedule that is not strictly decreasing")
    k = hybrid.resolve_skip(finite_sig, skip=skip, sigma_skip=sigma_skip, gaussian=gaussian)
    n = len(idx)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    if k == 0:
        latents, begin = x, 0
    else:
        s0, a0 = levels[0]
        x_ve = _teleport_dtype(x) * _SIGMA_AT_T1 if math.isinf(s0) else _teleport_dtype(x) / a0
        s0 = min(s0, _SIGMA_AT_T1)
        sk, ak = levels[k] if k < n else (0.0, 1.0)
        latents = (gaussian.teleport(x_ve, s0, sk) * ak).to(noise.dtype)
        begin = idx[k] if k < n else len(scheduler.timesteps)
    if set_begin_index and hasattr(scheduler, "set_begin_index") and begin < len(scheduler.timesteps):
        scheduler.set_begin_index(begin)
    return TeleportedLatents(latents=latents, timesteps=scheduler.timesteps[begin:], begin_index=begin, skip=k,
                             sigma=sig[k], n_steps=n)


def sample_with_scheduler(model, scheduler, noise: torch.Tensor, num_inference_steps: int | None = None,
                          gaussian=None, skip: int = 0, sigma_skip: float | None = None, model_kwargs=None,
                          step_kwargs=None, set_timesteps_kwargs=None, frame: str | None = None,
                          callback=None) -> SampleResult:
    """Run a diffusers scheduler loop from a teleported start.

    model: the network, called model(scheduler.scale_model_input(x, t), t expanded to [B], **model_kwargs)
    (a UNet2DModel's `.sample` output is unwrapped). num_inference_steps: passed to set_timesteps (with
    set_timesteps_kwargs, e.g. mu=...); None uses the scheduler's current schedule. step_kwargs go to
    scheduler.step (eta=, generator=). callback(i, t, x) runs after each step.
    Returns SampleResult(x, n_evals = network calls, sigma_start = VE level of the first call).
    """
    if not callable(model):
        raise TypeError(f"model must be callable model(x, t), got {type(model).__name__}")
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, device=noise.device, **(set_timesteps_kwargs or {}))
    start = teleport_latents(scheduler, gaussian, noise, skip=skip, sigma_skip=sigma_skip, frame=frame)
    x, n_evals = start.latents, 0
    scale_input = getattr(scheduler, "scale_model_input", None)  # flow-matching schedulers have none
    for i, t in enumerate(start.timesteps):
        model_in = x if scale_input is None else scale_input(x, t)
        out = network_output(model(model_in, t.to(noise.device).expand(x.shape[0]), **(model_kwargs or {})))
        n_evals += 1
        x = scheduler.step(out, t, x, **(step_kwargs or {})).prev_sample
        if callback is not None:
            callback(i, t, x)
    return SampleResult(x=x, n_evals=n_evals, sigma_start=start.sigma)


# ---------------------------------------------------------------------------------------------
# Pipelines: pass the tail of the schedule as timesteps= or sigmas=, and latents= at its start.
def _unshift_flow(scheduler, t: torch.Tensor, set_timesteps_kwargs) -> torch.Tensor:
    """Invert the flow-time shift that set_timesteps applies to custom sigmas."""
    cfg = _config(scheduler)
    if cfg.get("use_dynamic_shifting", False):
        mu = set_timesteps_kwargs.get("mu")
        if mu is None:
            raise ValueError("this scheduler uses dynamic shifting: pass set_timesteps_kwargs={'mu': ...}")
        if cfg.get("time_shift_type", "exponential") == "exponential":
            return 1 / (1 + math.exp(mu) * (1 / t - 1))
        return 1 / (1 + mu * (1 / t - 1))
    shift = float(cfg.get("shift", cfg.get("flow_shift", 1.0)))
    return t / (shift - (shift - 1) * t)


def _tail(full, name: str, begin: int, frame: str, set_timesteps_kwargs):
    """timesteps as a list; sigmas as a numpy array (some set_timesteps do array arithmetic on them)."""
    if name == "timesteps":
        return full.timesteps[begin:].tolist()
    sig = full.sigmas.to(torch.float64).cpu()
    if frame == "flow":  # flow schedulers append the terminal sigma themselves and shift custom sigmas
        return _unshift_flow(full, sig[begin:-1], set_timesteps_kwargs).numpy()
    return sig[begin:].numpy()


def _same_schedule(trial, full, begin: int) -> bool:
    def close(a, b):
        a, b = a.to(torch.float64).cpu(), b.to(torch.float64).cpu()
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-3)

    if not close(trial.timesteps, full.timesteps[begin:]):
        return False
    ts, fs = getattr(trial, "sigmas", None), getattr(full, "sigmas", None)
    return ts is None or fs is None or close(ts, fs[begin:])


def pipeline_kwargs(pipe, gaussian, noise: torch.Tensor, num_inference_steps: int, skip: int = 0,
                    sigma_skip: float | None = None, schedule: str = "auto", set_timesteps_kwargs=None,
                    frame: str | None = None) -> dict:
    """Keyword arguments that make a pipeline start from a teleported sample:

        out = pipe(prompt, **pipeline_kwargs(pipe, g, noise, 30, skip=6))

    Returns {"latents": ..., "timesteps": [...]} or {"latents": ..., "sigmas": [...]}: the last N - k
    entries of the schedule set_timesteps(num_inference_steps) would give, and the teleported latents
    divided by the init_noise_sigma the pipeline will multiply them by. pipe: a pipeline (its .scheduler is
    used, never modified) or a scheduler. schedule: "timesteps", "sigmas", or "auto" (the first that the
    scheduler's set_timesteps accepts and that reproduces the tail exactly). The pipeline must pass
    timesteps=/sigmas= on to scheduler.set_timesteps (the Stable Diffusion family, SD3, Flux do).
    """
    scheduler = getattr(pipe, "scheduler", pipe)
    _config(scheduler)
    kw = dict(set_timesteps_kwargs or {})
    if schedule not in ("auto", "timesteps", "sigmas"):
        raise ValueError(f"schedule must be 'auto', 'timesteps' or 'sigmas', got {schedule!r}")
    full = copy.deepcopy(scheduler)
    full.set_timesteps(num_inference_steps, **kw)
    frame = frame or scheduler_frame(full)
    start = teleport_latents(full, gaussian, noise, skip=skip, sigma_skip=sigma_skip, frame=frame,
                             set_begin_index=False)
    if start.begin_index >= len(full.timesteps):
        raise ValueError("the teleport reaches the end of the schedule; no pipeline steps remain")
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    if schedule != "auto":
        names = (schedule,)
    else:  # flow schedulers derive their sigmas from custom timesteps unshifted: prefer sigmas there
        names = ("sigmas", "timesteps") if frame == "flow" else ("timesteps", "sigmas")
    tried = []
    for name in names:
        if name not in accepted:
            tried.append(f"{name}= (not accepted)")
            continue
        if name == "sigmas" and getattr(full, "sigmas", None) is None:
            continue
        tail = _tail(full, name, start.begin_index, frame, kw)
        trial = copy.deepcopy(scheduler)
        try:
            trial.set_timesteps(**{name: tail}, **kw)
        except (ValueError, TypeError, NotImplementedError) as err:
            tried.append(f"{name}= ({err})")
            continue
        if not _same_schedule(trial, full, start.begin_index):
            tried.append(f"{name}= (gives a different schedule)")
            continue
        latents = start.latents / getattr(trial, "init_noise_sigma", 1.0)
        return {"latents": latents, name: tail}
    raise ValueError(f"{type(scheduler).__name__}.set_timesteps cannot reproduce the tail of its schedule: "
                     f"{'; '.join(tried) or 'no candidates'}. Use sample_with_scheduler instead.")
