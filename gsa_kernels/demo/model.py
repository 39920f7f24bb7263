"""A small EDM-preconditioned denoiser (Karras et al. 2022) for flat images: a residual MLP with a
noise-level embedding.

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4

The preconditioning keeps the network's input and target at unit variance at every noise level, so one
small MLP covers sigma from 0.002 to 80.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .._validation import as_sigma, check_tensor


@dataclass
class DenoiserConfig:
    dim: int = 64  # d = C*H*W
    hidden: int = 256
    blocks: int = 4
    embed: int = 64  # size of the noise-level embedding
    sigma_data: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


class FourierEmbedding(nn.Module):
    """Fixed random Fourier features of the scalar c_noise (as in EDM's NCSN++ variant)."""

    def __init__(self, size: int, scale: float = 4.0, seed: int = 0):
        super().__init__()
        if size % 2:
            raise ValueError(f"embed must be even, got {size}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(size // 2, generator=g) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angle = 2 * math.pi * c_noise[:, None] * self.freqs[None, :]
        return torch.cat([angle.cos(), angle.sin()], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int, embed: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(embed, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        # Start each block as the identity so the deep MLP trains from a well-conditioned point.
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.fc1(nn.functional.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(nn.functional.silu(z))


class EDMDenoiser(nn.Module):
    """D(x; sigma) for x of shape [B, ...] with prod(...) = config.dim and sigma a float or a [B] tensor."""

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        if config.sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {config.sigma_data}")
        self.config = config
        self.sigma_data = float(config.sigma_data)
        self.embedding = FourierEmbedding(config.embed)
        self.embed_mlp = nn.Sequential(nn.Linear(config.embed, config.embed), nn.SiLU(),
                                       nn.Linear(config.embed, config.embed))
        self.inp = nn.Linear(config.dim, config.hidden)
        self.blocks = nn.ModuleList(ResidualBlock(config.hidden, config.embed) for _ in range(config.blocks))
        self.out_norm = nn.LayerNorm(config.hidden)
        self.out = nn.Linear(config.hidden, config.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        check_tensor("x", x)
        shape = x.shape
        flat = x.reshape(shape[0], -1)
        if flat.shape[1] != self.config.dim:
            raise ValueError(f"x must have {self.config.dim} values per sample, got shape {tuple(shape)}")
        s = as_sigma("sigma", sigma, shape[0], x.device, dtype=x.dtype)
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1.0 / (s**2 + sd**2).sqrt()
        c_noise = s.log() / 4
        emb = self.embed_mlp(self.embedding(c_noise))
        h = self.inp(c_in[:, None] * flat)
        for block in self.blocks:
            h = block(h, emb)
        f = self.out(nn.functional.silu(self.out_norm(h)))
        return (c_skip[:, None] * flat + c_out[:, None] * f).reshape(shape)
