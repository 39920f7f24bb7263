"""Analysis tools of the Gaussian-score papers (docs/math.md section 5), for any denoiser.

A *denoiser* here is either a callable ``D(x, sigma) -> x0_hat`` (x: [B, ...], sigma: a [B] tensor; a
trained network, or ``sampling``'s convention) or an object with a ``.denoise(x, sigma)`` method
(``GaussianModel``, ``GMM``, ``DeltaMixture``; their denoisers run on the fused ops).

- ``explained_variance`` / ``explained_variance_curves``: how much of a reference denoiser's (or score's)
  variation a model explains, EV = 1 - ||a - b||^2 / ||a||^2 per sample, averaged over
  x = x_train + sigma eps, for each sigma (Wang and Vastola).
- ``linearity``: the best affine map fitted to a denoiser at each sigma, compared with the Gaussian
  denoiser's affine map (normalized difference, cosine), and how much of the denoiser it explains
  (Li et al., hidden Gaussian structure).
- ``record_trajectory`` / ``gaussian_trajectory`` and ``chord_deviation``, ``step_alignment``,
  ``denoising_distances``: geometry of sampling trajectories and of their denoising trajectories
  (Chen et al.).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from dataclasses import dataclass

import torch

from ._validation import check_finite, check_tensor

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

QUANTITIES = ("score", "denoiser")


def as_denoiser(model, name: str = "model") -> Denoiser:
    """A callable D(x, sigma[B]) for a callable or an object with a .denoise method."""
    if hasattr(model, "denoise") and callable(model.denoise):
        return model.denoise
    if callable(model):
        return model
    raise TypeError(f"{name} must be callable as D(x, sigma) or have a .denoise(x, sigma) method, "
                    f"got {type(model).__name__}")


def _check_sigmas(sigmas) -> list[float]:
    values = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if not values:
        raise ValueError("sigmas must not be empty")
    if any(not (s > 0) or s == float("inf") for s in values):
        raise ValueError(f"sigmas must be finite and > 0, got {values}")
    return values


def _check_data(data) -> torch.Tensor:
    check_tensor("data", data)
    if data.dim() < 2 or data.shape[0] < 1:
        raise ValueError(f"data must be [N >= 1, ...], got shape {tuple(data.shape)}")
    check_finite("data", data)
    return data


def _noisy_queries(data: torch.Tensor, sigma: float, n_samples: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n_samples points x = x_train + sigma eps (training rows cycled in order, fresh noise) and the [B] sigma."""
    idx = torch.arange(n_samples, device=data.device) % data.shape[0]
    x0 = data[idx]
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
    return x0 + sigma * eps, torch.full((n_samples,), sigma, dtype=data.dtype, device=data.device)


@torch.no_grad()
def explained_variance_curves(reference, models: Mapping[str, object], data: torch.Tensor, sigmas, *,
                              quantity: str = "score", n_samples: int | None = None, batch_size: int = 2048,
                              seed: int = 0, center: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """EV(sigma) of `reference` by each of `models`, on the same noisy points (the reference is evaluated
    once per point). Returns {name: [S] tensor} of the per-sample EV averaged over the points.

    quantity="score": a, b are scores (D - x) / sigma^2, so per sample EV = 1 - ||Da - Db||^2 / ||Da - x||^2.
    quantity="denoiser": a, b are denoiser outputs centred at `center` (default: the data mean), so that
    the constant offset of the data does not count as "explained".
    """
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty mapping {name: denoiser}")
    data = _check_data(data)
    sig = _check_sigmas(sigmas)
    ref = as_denoiser(reference, "reference")
    fns = {name: as_denoiser(m, f"models[{name!r}]") for name, m in models.items()}
    n = data.shape[0] if n_samples is None else int(n_samples)
    if n < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if quantity == "denoiser":
        center = data.mean(dim=0) if center is None else center.to(data)
    generator = torch.Generator().manual_seed(seed)
    curves = {name: torch.empty(len(sig), dtype=torch.float64) for name in fns}
    for i, s in enumerate(sig):
        x_all, s_all = _noisy_queries(data, s, n, generator)
        totals = dict.fromkeys(fns, 0.0)
        for lo in range(0, n, batch_size):
            x, sb = x_all[lo:lo + batch_size], s_all[lo:lo + batch_size]
            a = ref(x, sb).reshape(x.shape[0], -1).double()
            anchor = (x.reshape(x.shape[0], -1).double() if quantity == "score"
                      else center.reshape(1, -1).double())
            norm = (a - anchor).square().sum(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
            for name, fn in fns.items():
                b = fn(x, sb).reshape(x.shape[0], -1).double()
                totals[name] += float(((a - b).square().sum(dim=1) / norm).sum())
        for name in fns:
            curves[name][i] = 1.0 - totals[name] / n
    return curves


def explained_variance(reference, model, data: torch.Tensor, sigmas, **kwargs) -> torch.Tensor:
    """EV(sigma) of `reference` by one `model`; see explained_variance_curves. Returns an [S] tensor."""
    return explained_variance_curves(reference, {"model": model}, data, sigmas, **kwargs)["model"]


# ----------------------------------------------------------------------------------------------------
# Linearity


@torch.no_grad()
def affine_map_of(denoiser, dim: int, sigma: float, *, dtype=torch.float32, device="cpu", shape=None):
    """(W [d, d], b [d]) of a denoiser that is affine in x at this sigma, D(x) = W x + b (the Gaussian's),
    read off its outputs at 0 and at the unit vectors: b = D(0), W e_j = D(e_j) - D(0)."""
    fn = as_denoiser(denoiser, "denoiser")
    shape = (dim,) if shape is None else tuple(shape)
    inputs = torch.cat([torch.zeros(1, dim, dtype=dtype, device=device),
                        torch.eye(dim, dtype=dtype, device=device)])
    out = fn(inputs.reshape(dim + 1, *shape), torch.full((dim + 1,), float(sigma), dtype=dtype, device=device))
    out = out.reshape(dim + 1, dim).double()
    b = out[0]
    return (out[1:] - b).T.contiguous(), b


@torch.no_grad()
def fit_affine(denoiser, data: torch.Tensor, sigma: float, *, n_samples: int | None = None,
               batch_size: int = 2048, seed: int = 0):
    """Least-squares affine map (W [d, d], b [d]) from x = x_train + sigma eps to D(x; sigma), and the
    fraction of D's variance (about its mean) that the map explains (R^2). Float64 solve."""
    fn = as_denoiser(denoiser, "denoiser")
    data = _check_data(data)
    d = data[0].numel()
    n = max(4 * d, data.shape[0]) if n_samples is None else int(n_samples)
    if n <= d:
        raise ValueError(f"n_samples must exceed the dimension d = {d} to fit a d x d map, got {n}")
    generator = torch.Generator().manual_seed(seed)
    x_all, s_all = _noisy_queries(data, float(sigma), n, generator)
    y = torch.cat([fn(x_all[lo:lo + batch_size], s_all[lo:lo + batch_size]).reshape(-1, d)
                   for lo in range(0, n, batch_size)]).double()
    x = x_all.reshape(n, d).double()
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    wt = torch.linalg.lstsq(xc, yc, driver="gelsd").solution  # [d, d] = W^T
    w = wt.T.contiguous()
    b = y_mean - w @ x_mean
    resid = (yc - xc @ wt).square().sum()
    r2 = 1.0 - float(resid / yc.square().sum().clamp_min(torch.finfo(torch.float64).tiny))
    return w, b, r2


@dataclass
class LinearityCurves:
    sigmas: list[float]
    r2: torch.Tensor  # [S] fraction of the denoiser's variance explained by its best affine map
    difference: torch.Tensor  # [S] ||W_fit - W_gauss||_F / ||W_fit||_F
    cosine: torch.Tensor  # [S] <W_fit, W_gauss>_F / (||W_fit||_F ||W_gauss||_F)


@torch.no_grad()
def linearity(denoiser, gaussian, data: torch.Tensor, sigmas, *, n_samples: int | None = None,
              batch_size: int = 2048, seed: int = 0) -> LinearityCurves:
    """For each sigma: fit the best affine map to `denoiser` on x = x_train + sigma eps and compare its
    matrix with the Gaussian denoiser's (`gaussian`: an affine denoiser, e.g. a GaussianModel)."""
    data = _check_data(data)
    sig = _check_sigmas(sigmas)
    d = data[0].numel()
    r2, diff, cos = (torch.empty(len(sig), dtype=torch.float64) for _ in range(3))
    for i, s in enumerate(sig):
        w_fit, _b, r2[i] = fit_affine(denoiser, data, s, n_samples=n_samples, batch_size=batch_size, seed=seed + i)
        w_g, _bg = affine_map_of(gaussian, d, s, dtype=data.dtype, device=data.device, shape=data.shape[1:])
        diff[i] = torch.linalg.norm(w_fit - w_g) / torch.linalg.norm(w_fit)
        cos[i] = (w_fit * w_g).sum() / (torch.linalg.norm(w_fit) * torch.linalg.norm(w_g))
    return LinearityCurves(sig, r2, diff, cos)


# ----------------------------------------------------------------------------------------------------
# Trajectory geometry


@dataclass
class Trajectory:
    """A sampling trajectory x(sigma_i), i = 0..T (sigma_T = 0, x[T] the sample), and its denoising
    trajectory D(x(sigma_i); sigma_i), i = 0..T-1."""

    sigmas: torch.Tensor  # [T + 1], decreasing, ending in 0
    x: torch.Tensor  # [T + 1, B, d]
    denoised: torch.Tensor  # [T, B, d]


class _Recorder:
    """Wraps a denoiser and keeps, per noise level, the last (x, D(x)) it was called with. For Euler,
    Heun and DPM-Solver++(2M) that is the trajectory point itself (Heun's corrector evaluates at sigma_i
    before step i starts from x_i); for UniPC it is the predictor's point, before the corrector."""

    def __init__(self, fn: Denoiser):
        self.fn = fn
        self.levels: list[float] = []
        self.x: list[torch.Tensor] = []
        self.out: list[torch.Tensor] = []

    def __call__(self, x, sigma):
        out = self.fn(x, sigma)
        level = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        entry = (x.detach().reshape(x.shape[0], -1).clone(), out.detach().reshape(x.shape[0], -1).clone())
        if self.levels and self.levels[-1] == level:
            self.x[-1], self.out[-1] = entry
        else:
            self.levels.append(level)
            self.x.append(entry[0])
            self.out.append(entry[1])
        return out


@torch.no_grad()
def record_trajectory(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, method: str = "heun",
                      **sample_kwargs) -> Trajectory:
    """Run gsa_kernels.sampling.sample and record the trajectory and its denoising trajectory.
    sample_kwargs go to sample (e.g. gaussian=..., skip=k: the trajectory then starts at sigmas[k])."""
    from . import sampling

    rec = _Recorder(as_denoiser(denoiser, "denoiser"))
    result = sampling.sample(rec, noise, sigmas, method=method, **sample_kwargs)
    if not rec.levels:
        raise ValueError("the sampler made no denoiser calls; nothing to record")
    final = result.x.detach().reshape(noise.shape[0], -1)
    levels = torch.tensor(rec.levels + [0.0], dtype=torch.float64)
    return Trajectory(levels, torch.stack(rec.x + [final]), torch.stack(rec.out))


@torch.no_grad()
def gaussian_trajectory(gaussian, noise: torch.Tensor, sigmas: torch.Tensor) -> Trajectory:
    """The exact PF-ODE trajectory of a Gaussian model from x = sigmas[0] * noise, in closed form at each
    sigma (teleport), with its denoising trajectory (docs/math.md section 2.2)."""
    check_tensor("noise", noise)
    levels = [float(s) for s in sigmas.tolist()]
    if len(levels) < 2 or levels[-1] != 0.0 or any(a <= b for a, b in zip(levels, levels[1:])):
        raise ValueError("sigmas must be strictly decreasing and end in 0")
    b = noise.shape[0]
    x0 = levels[0] * noise
    xs, ds = [], []
    for s in levels:
        x = x0 if s == levels[0] else gaussian.teleport(x0, levels[0], s)
        xs.append(x.reshape(b, -1))
        if s > 0:
            ds.append(gaussian.denoise(x, s).reshape(b, -1))
    return Trajectory(torch.tensor(levels, dtype=torch.float64), torch.stack(xs), torch.stack(ds))


def _check_traj(traj: Trajectory) -> None:
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj must be a Trajectory, got {type(traj).__name__}")
    if traj.x.dim() != 3 or traj.x.shape[0] < 2:
        raise ValueError(f"traj.x must be [T + 1 >= 2, B, d], got shape {tuple(traj.x.shape)}")


def chord_deviation(traj: Trajectory, *, relative: bool = True) -> torch.Tensor:
    """[T + 1]: mean over the batch of the distance of x(sigma_i) from the straight line (chord) through
    x(sigma_0) and the sample x(0); divided by the chord's length when relative (0 at both ends)."""
    _check_traj(traj)
    x = traj.x.double()
    start, chord = x[0], x[-1] - x[0]  # [B, d]
    length = chord.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    unit = chord / length[:, None]
    rel = x - start
    perp = rel - (rel * unit).sum(dim=2, keepdim=True) * unit
    dist = perp.norm(dim=2)  # [T + 1, B]
    return (dist / length if relative else dist).mean(dim=1)


def step_alignment(traj: Trajectory) -> torch.Tensor:
    """[T]: mean cosine between each step x(sigma_i) -> x(sigma_i+1) and the direction x(sigma_i) -> x(0)
    to the final sample (1 = the step heads straight for where the trajectory ends)."""
    _check_traj(traj)
    x = traj.x.double()
    step = x[1:] - x[:-1]
    to_end = x[-1][None] - x[:-1]
    tiny = torch.finfo(torch.float64).tiny
    cos = (step * to_end).sum(dim=2) / (step.norm(dim=2) * to_end.norm(dim=2)).clamp_min(tiny)
    return cos.mean(dim=1)


def denoising_distances(traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
    """([T], [T]): mean distance to the final sample of the sampling trajectory x(sigma_i) and of the
    denoising trajectory D(x(sigma_i); sigma_i), i = 0..T-1. The denoising trajectory gets there sooner."""
    _check_traj(traj)
    final = traj.x[-1].double()[None]
    return ((traj.x[:-1].double() - final).norm(dim=2).mean(dim=1),
            (traj.denoised.double() - final).norm(dim=2).mean(dim=1))


def log_sigma_grid(n: int = 25, sigma_min: float = 0.002, sigma_max: float = 80.0) -> list[float]:
    """n sigmas spaced evenly in log sigma (the papers' analysis axis)."""
    if n < 2 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"need n >= 2 and 0 < sigma_min < sigma_max, got {n}, {sigma_min}, {sigma_max}")
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return [sigma_min] + [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(1, n - 1)] + [sigma_max]


__all__ = [
    "as_denoiser", "explained_variance", "explained_variance_curves", "affine_map_of", "fit_affine",
    "linearity", "LinearityCurves", "Trajectory", "record_trajectory", "gaussian_trajectory",
    "chord_deviation", "step_alignment", "denoising_distances", "log_sigma_grid",
]
