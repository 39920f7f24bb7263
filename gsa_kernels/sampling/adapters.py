"""Adapters: networks of other parameterisations as denoisers denoiser(x_ve, sigma) -> x0_hat.

- `VPDenoiser` wraps a discrete-time VP network (DDPM/DDIM/Stable Diffusion; e.g. a diffusers UNet2DModel,
  called as unet(x_vp, t).sample) predicting eps, v or x0. With abar = 1 / (1 + sigma^2) (docs/math.md section 1):
  x_vp = sqrt(abar) x_ve, the timestep t is interpolated from sigma on the training schedule, and
      eps:  x0 = x_ve - sigma * eps
      v:    x0 = sqrt(abar) x_vp - sqrt(1 - abar) v
      x0:   x0 = out
- `FlowDenoiser` wraps a rectified-flow velocity network (v = eps - x0, SD3/Flux style): t = sigma / (1 + sigma),
  x_flow = (1 - t) x_ve, x0 = x_flow - t v.

Both are pure tensor code (no host synchronisation), so samplers using them stay CUDA-graph capturable.
"""
from __future__ import annotations

import torch
from torch import nn

from . import schedules

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def network_output(out) -> torch.Tensor:
    """The tensor of a network's return value: diffusers' `.sample`, a tuple's first entry, or a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the network returned {type(out).__name__}; expected a tensor, an object with a .sample "
                    f"tensor, or a tuple whose first entry is a tensor")


def _column(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


class VPDenoiser(nn.Module):
    """denoiser(x_ve, sigma) of a VP network `model(x_vp, t, **kwargs)`.

    alphas_cumprod: [T] training schedule. prediction_type: "epsilon", "v_prediction" or "sample".
    quantize: round t to the nearest training timestep (for networks that only saw integer t);
        otherwise t is fractional (log-sigma interpolation), which sinusoidal embeddings accept.
    learned_variance: the network returns 2C channels (mean, variance); the first C are used.
    Extra keyword arguments of a call (encoder_hidden_states=..., class_labels=...) go to the network.
    """

    def __init__(self, model, alphas_cumprod, prediction_type: str = "epsilon", quantize: bool = False,
                 learned_variance: bool = False):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable model(x, t), got {type(model).__name__}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.model = model
        abar = schedules._check_alphas_cumprod(torch.as_tensor(alphas_cumprod)).detach().to(torch.float64)
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        self.prediction_type = prediction_type
        self.quantize = quantize
        self.learned_variance = learned_variance

    @property
    def sigma_min(self) -> float:
        return float(schedules.vp_train_sigmas(self.alphas_cumprod)[0])

    @property
    def sigma_max(self) -> float:
        return float(schedules.vp_train_sigmas(self.alphas_cumprod)[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        t = schedules.sigma_to_timestep(sigma, self.alphas_cumprod)
        return t.round() if self.quantize else t

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **model_kwargs) -> torch.Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = _column(sigma, x)
        c_in = torch.rsqrt(1 + s * s)  # sqrt(abar)
        x_vp = x * c_in
        out = network_output(self.model(x_vp, self.timestep(sigma), **model_kwargs))
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input {tuple(x.shape)}"
                             + ("" if self.learned_variance else "; pass learned_variance=True if it also "
                                                                  "predicts a variance"))
        out = out.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return c_in * (x_vp - s * out)
        return out


class FlowDenoiser(nn.Module):
    """denoiser(x_ve, sigma) of a rectified-flow velocity network `model(x_flow, t * num_train_timesteps)`
    predicting v = eps - x0 (diffusers' "flow_prediction")."""

    def __init__(self, model, num_train_timesteps: int = 1000):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable model(x, t), got {type(model).__name__}")
        self.model = model
        self.num_train_timesteps = num_train_timesteps

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **model_kwargs) -> torch.Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        t = sigma / (1 + sigma)
        tc = _column(t, x)
        x_flow = x * (1 - tc)
        v = network_output(self.model(x_flow, t * self.num_train_timesteps, **model_kwargs)).to(x.dtype)
        return x_flow - tc * v
