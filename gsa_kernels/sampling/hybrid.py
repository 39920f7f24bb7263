"""The hybrid sampler's two decisions (docs/math.md section 4): where to teleport to, and the teleport itself.

- `resolve_skip` turns skip=k or a target sigma_skip into the index k of the schedule the sampler starts at.
- `teleport_start` draws nothing: it maps x_init = sigmas[0] * noise to sigmas[k] with the Gaussian's
  closed-form PF-ODE solution (one fused op).
- `choose_sigma_skip` picks sigma_skip from the models: the lowest noise level down to which the Gaussian's
  denoiser explains the reference denoiser (a GMM or training-set model fitted to the same data, or the
  network itself) to within `tol` of explained variance (docs/math.md section 5).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


def resolve_skip(sig: list, skip: int = 0, sigma_skip=None, gaussian=None) -> int:
    """Index k of the schedule `sig` (host floats, descending) at which the sampler starts.

    skip: number of steps to teleport over, 0 <= skip <= N. sigma_skip (a number or a SigmaSkipChoice):
    the largest k with sig[k] >= sigma_skip (the teleport never goes below sigma_skip; inf means no
    teleport). A k > 0 needs a `gaussian`.
    """
    n = len(sig) - 1
    if isinstance(skip, bool) or not isinstance(skip, numbers.Integral):
        raise TypeError(f"skip must be an integer, got {type(skip).__name__}")
    if not 0 <= skip <= n:
        raise ValueError(f"skip must lie in [0, N = {n}], got {skip}")
    if sigma_skip is not None:
        if skip:
            raise ValueError("give either skip or sigma_skip, not both")
        if isinstance(sigma_skip, SigmaSkipChoice):
            sigma_skip = sigma_skip.sigma_skip
        if isinstance(sigma_skip, torch.Tensor):
            if sigma_skip.numel() != 1:
                raise ValueError("sigma_skip must be a single number")
            sigma_skip = float(sigma_skip)
        if isinstance(sigma_skip, bool) or not isinstance(sigma_skip, numbers.Real) or math.isnan(sigma_skip) \
                or sigma_skip < 0:
            raise ValueError(f"sigma_skip must be a number >= 0, got {sigma_skip!r}")
        skip = max(sum(1 for s in sig if s >= sigma_skip) - 1, 0)
    if skip and gaussian is None:
        raise ValueError("teleporting (skip > 0 or sigma_skip) needs a gaussian model")
    if gaussian is not None and not callable(getattr(gaussian, "teleport", None)):
        raise TypeError(f"gaussian must have a .teleport(x, sigma_from, sigma_to) method, got "
                        f"{type(gaussian).__name__}")
    return int(skip)


def teleport_start(gaussian, noise: torch.Tensor, sig: list, k: int) -> torch.Tensor:
    """x at sig[k] on the Gaussian's PF-ODE trajectory from x_init = sig[0] * noise (x_init itself if k = 0)."""
    x = noise * sig[0]
    if k == 0:
        return x
    return gaussian.teleport(x, sig[0], sig[k]).to(noise.dtype)


# ---------------------------------------------------------------------------------------------
def _denoise_fn(model):
    fn = getattr(model, "denoise", None)
    if callable(fn):
        return fn
    if callable(model):
        return model
    raise TypeError(f"models must be denoisers (callable or with .denoise), got {type(model).__name__}")


@torch.no_grad()
def pooled_explained_variance(model, reference, data: torch.Tensor, sigmas, n_noise: int = 1, generator=None,
                              batch_size: int = 1024) -> torch.Tensor:
    """EV(sigma) = 1 - sum ||s_ref - s_model||^2 / sum ||s_ref||^2 of the scores s = (D(x) - x) / sigma^2 at
    x = data + sigma * eps (docs/math.md section 5), for each sigma in `sigmas`; float64 [len(sigmas)].

    Pooled over the batch (a ratio of sums), which is what the sigma_skip chooser needs: one number per
    sigma, dominated by the samples with large scores. The papers' per-sample average of the ratio, with
    the analysis options, is gsa_kernels.analysis.explained_variance.

    The score form weighs denoiser errors against the PF-ODE velocity (x - D) / sigma, so EV near 1 means
    the two ODEs (and so their trajectories) agree at that noise level."""
    d_model, d_ref = _denoise_fn(model), _denoise_fn(reference)
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] < 1:
        raise ValueError("data must be a tensor [N, ...] of clean samples")
    sig = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if any(not s > 0 for s in sig):
        raise ValueError("sigmas must be > 0")
    out = []
    for s in sig:
        num = den = 0.0
        for _ in range(n_noise):
            for x0 in data.split(batch_size):
                x = x0 + s * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                sv = torch.full((x0.shape[0],), s, dtype=x0.dtype, device=x0.device)
                ref = d_ref(x, sv).to(torch.float64)
                err = d_model(x, sv).to(torch.float64) - ref
                num += float(err.square().sum())
                den += float((ref - x.to(torch.float64)).square().sum())
        out.append(1.0 - num / max(den, 1e-300))
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class SigmaSkipChoice:
    """sigma_skip: the chosen level (math.inf: teleport nowhere); sigmas/explained_variance: the EV curve."""

    sigma_skip: float
    sigmas: torch.Tensor
    explained_variance: torch.Tensor

    def __float__(self) -> float:
        return self.sigma_skip


def choose_sigma_skip(gaussian, reference_model, data: torch.Tensor, tol: float = 1e-4, sigmas=None,
                      n_noise: int = 1, generator=None, batch_size: int = 1024) -> SigmaSkipChoice:
    """Choose sigma_skip automatically: scanning `sigmas` from high to low, the last level before the
    explained variance of the reference denoiser by the Gaussian drops below 1 - tol.

    gaussian: the GaussianModel you will teleport with. reference_model: a model of the same data whose
    denoiser is trusted at low noise: a GMM / DeltaMixture fitted to the data, or the network denoiser
    itself (any denoiser(x, sigma)). data: clean samples [N, ...] (training data, or samples of the
    reference). sigmas: the grid to scan (default: 40 levels geometric in [0.02, 80]).
    Returns SigmaSkipChoice (float() gives sigma_skip); pass it as sample(..., sigma_skip=choice.sigma_skip).
    If even the largest sigma disagrees, sigma_skip is math.inf (no teleport); if all agree, the smallest.
    """
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol < 1:
        raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
    if sigmas is None:
        sigmas = torch.logspace(math.log10(80.0), math.log10(0.02), 40, dtype=torch.float64)
    grid = sorted((float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)),
                  reverse=True)
    ev = pooled_explained_variance(gaussian, reference_model, data, grid, n_noise=n_noise, generator=generator,
                            batch_size=batch_size)
    chosen = math.inf
    for s, e in zip(grid, ev.tolist()):
        if e < 1 - tol:
            break
        chosen = s
    return SigmaSkipChoice(chosen, torch.tensor(grid, dtype=torch.float64), ev)
