"""A float64 full-covariance Gaussian mixture with its exact denoiser, and a fine-step PF-ODE solver.

Ground truth for the sampler accuracy experiments (docs/sampling.md): with data from a GMM the score is
known exactly (docs/math.md section 3 with r = d), so the probability-flow ODE can be solved to ~1e-9 and every
sampler's error measured against it. Kept independent of the fused mixture kernels on purpose.
"""
from __future__ import annotations

import math

import torch


class FullCovGMM:
    """sum_k w_k N(mu_k, C_k) in float64, C_k = V_k diag(lam_k) V_k^T."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor):
        self.log_weights = torch.log(torch.as_tensor(weights, dtype=torch.float64) / sum(weights))
        self.means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        self.covs = covs
        lam, vecs = torch.linalg.eigh(covs)
        self.lam, self.vecs = lam.clamp_min(0), vecs
        self.dim = self.means.shape[1]

    @classmethod
    def random(cls, dim: int = 16, n_components: int = 5, mean_scale: float = 1.5, var_range=(0.01, 0.3),
               seed: int = 0) -> "FullCovGMM":
        """Random rotations, eigenvalues log-uniform in var_range, means ~ N(0, mean_scale^2 I)."""
        g = torch.Generator().manual_seed(seed)
        means = mean_scale * torch.randn(n_components, dim, generator=g, dtype=torch.float64)
        lo, hi = math.log(var_range[0]), math.log(var_range[1])
        lam = torch.exp(lo + (hi - lo) * torch.rand(n_components, dim, generator=g, dtype=torch.float64))
        q, _ = torch.linalg.qr(torch.randn(n_components, dim, dim, generator=g, dtype=torch.float64))
        covs = q @ torch.diag_embed(lam) @ q.transpose(1, 2)
        weights = 0.5 + torch.rand(n_components, generator=g, dtype=torch.float64)
        return cls(weights, means, covs)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean and covariance of the mixture."""
        w = self.log_weights.exp()
        mean = (w[:, None] * self.means).sum(0)
        second = (w[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return mean, second - torch.outer(mean, mean)

    def gaussian(self, dtype=torch.float32):
        """The GaussianModel with the mixture's exact mean and covariance (the Gaussian fitted to its data)."""
        from ..gaussian.model import GaussianModel

        mean, cov = self.moments()
        lam, vecs = torch.linalg.eigh(cov)
        return GaussianModel(mean.to(dtype), vecs.flip(1).contiguous().to(dtype), lam.flip(0).clamp_min(0).to(dtype))

    def sample(self, n: int, generator=None) -> torch.Tensor:
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + torch.einsum("nij,nj->ni", self.vecs[comp], z * self.lam[comp].sqrt())

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact E[x0 | x] at VE level sigma (number or [B]), float64 arithmetic, returned in x's dtype."""
        x2 = x.reshape(x.shape[0], self.dim).to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2
        c = torch.einsum("bkd,kdr->bkr", x2[:, None, :] - self.means[None], self.vecs)  # eigen-coefficients
        var = self.lam[None] + s2                                                         # [B, K, d]
        logits = self.log_weights - 0.5 * ((c * c / var).sum(-1) + torch.log(var).sum(-1))
        w = torch.softmax(logits, dim=1)
        comp = self.means[None] + torch.einsum("bkr,kdr->bkd", c * self.lam[None] / var, self.vecs)
        return (w[..., None] * comp).sum(1).reshape(x.shape).to(x.dtype)


def solve_pf_ode(denoiser, x: torch.Tensor, sigma_from: float, sigma_to: float = 0.0, steps: int = 2000,
                 sigma_floor: float = 1e-4) -> torch.Tensor:
    """Fine-step classical RK4 on dx/d(log sigma) = x - D(x; sigma) from sigma_from down to
    max(sigma_to, sigma_floor), then (for sigma_to = 0) a last x = D(x; sigma_floor), whose error is
    O(sigma_floor^2 / lam_min). Runs in x's dtype (pass float64)."""
    lo = max(sigma_to, sigma_floor)
    s_grid = torch.linspace(math.log(sigma_from), math.log(lo), steps + 1, dtype=torch.float64).tolist()

    def f(x, s):
        return x - denoiser(x, torch.full((x.shape[0],), math.exp(s), dtype=x.dtype))

    for a, b in zip(s_grid, s_grid[1:]):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + 0.5 * h * k1, a + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, a + 0.5 * h)
        k4 = f(x + h * k3, b)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    if sigma_to == 0:
        x = denoiser(x, torch.full((x.shape[0],), lo, dtype=x.dtype))
    return x
