"""Probability-flow samplers on the k-diffusion convention, with analytical teleportation (docs/math.md section 4).

A denoiser is a callable `denoiser(x, sigma) -> x0_hat` with x in the VE frame (x = x0 + sigma * eps) and
sigma a [B] tensor; any object with a `.denoise(x, sigma)` method (GaussianModel, GMM, DeltaMixture) is
one too. The samplers integrate dx/dsigma = (x - D(x; sigma)) / sigma along a descending schedule
sigma_0 > ... > sigma_N (usually sigma_N = 0):

  euler     first-order Euler, optional EDM churn
  heun      EDM Heun (Karras et al. 2022, algorithm 2): 2nd order, 2N - 1 evaluations, optional churn
  ddim      DDIM with eta (eta = 0: deterministic, the Euler step in the VE frame)
  dpmpp_2m  DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep in log sigma
  unipc     UniPC (Zhao et al. 2023) with the B(h) = e^h - 1 ("bh2") or h ("bh1") variant, order 2 or 3

Host synchronisation: the schedule is read to the host once, before the first step (sigmas may be a
Python sequence to avoid even that). Every step coefficient is then a Python float computed on the host,
and a step is a fixed sequence of tensor ops with no .item(), no Python branching on tensor values and no
device-to-host copies, so each step can be captured in a CUDA graph (together with the user's denoiser).
The noise of churn/eta steps is drawn with `generator` (a torch.Generator on the device of x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from . import hybrid

METHODS = ("euler", "heun", "ddim", "dpmpp_2m", "unipc")


@dataclass
class SampleResult:
    """x: the final sample; n_evals: denoiser (network) evaluations made; sigma_start: the noise level at
    which the sampler started (sigmas[k] after a teleport of k steps, else sigmas[0])."""

    x: torch.Tensor
    n_evals: int
    sigma_start: float


def as_denoiser(model) -> Callable:
    """`model.denoise` for the package's data models, the callable itself otherwise."""
    denoise = getattr(model, "denoise", None)
    if callable(denoise):
        return denoise
    if callable(model):
        return model
    raise TypeError(f"denoiser must be a callable denoiser(x, sigma) -> x0_hat or have a .denoise method, "
                    f"got {type(model).__name__}")


def schedule_to_host(sigmas, name: str = "sigmas") -> list[float]:
    """A descending noise schedule as Python floats (the only host read of a sampler; done before step 0)."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got shape {tuple(sigmas.shape)}")
        values = [float(v) for v in sigmas.detach().to("cpu", torch.float64).tolist()]
    elif isinstance(sigmas, (Sequence, np.ndarray)) and not isinstance(sigmas, (str, bytes)):
        values = [float(v) for v in sigmas]
    else:
        raise TypeError(f"{name} must be a 1-D tensor or a sequence of numbers, got {type(sigmas).__name__}")
    if len(values) < 2:
        raise ValueError(f"{name} must hold at least 2 noise levels (one step), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite")
    if values[-1] < 0:
        raise ValueError(f"{name} must be >= 0, got final value {values[-1]}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly decreasing")
    return values


class _Evaluator:
    """Calls the denoiser with a [B] sigma tensor and counts the calls (a host-side count: no sync)."""

    def __init__(self, denoiser, callback=None):
        self.denoiser = as_denoiser(denoiser)
        self.callback = callback
        self.n_evals = 0

    def __call__(self, x: torch.Tensor, sigma: float, i: int) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        denoised = self.denoiser(x, torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device))
        self.n_evals += 1
        if self.callback is not None:
            self.callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
        return denoised


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _to_sigma(x: torch.Tensor, denoised: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The first-order (Euler = DDIM) step D + (sigma_to / sigma_from) (x - D); exactly D at sigma_to = 0."""
    return torch.lerp(denoised, x, sigma_to / sigma_from)


# ---------------------------------------------------------------------------------------------
# EDM churn (Karras et al. 2022, algorithm 2): raise sigma to sigma_hat = (1 + gamma) sigma with fresh noise.
def _churn_gammas(sig, s_churn, s_tmin, s_tmax):
    n = len(sig) - 1
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}")
    g = min(s_churn / n, math.sqrt(2.0) - 1)
    return [g if (s_churn > 0 and s_tmin <= s <= s_tmax) else 0.0 for s in sig[:-1]]


def _churn(x, sigma, gamma, s_noise, generator):
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + _noise_like(x, generator) * (s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)), sigma_hat


def _euler(ev, x, sig, *, generator=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    gammas = _churn_gammas(sig, s_churn, s_tmin, s_tmax)
    for i in range(len(sig) - 1):
        x, sigma_hat = _churn(x, sig[i], gammas[i], s_noise, generator)
        x = _to_sigma(x, ev(x, sigma_hat, i), sigma_hat, sig[i + 1])
    return x


def _heun(ev, x, sig, *, generator=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    gammas = _churn_gammas(sig, s_churn, s_tmin, s_tmax)
    for i in range(len(sig) - 1):
        x, sigma_hat = _churn(x, sig[i], gammas[i], s_noise, generator)
        sigma_next = sig[i + 1]
        denoised = ev(x, sigma_hat, i)
        x_euler = _to_sigma(x, denoised, sigma_hat, sigma_next)
        if sigma_next == 0:  # host float: the last step to sigma = 0 is an Euler step (EDM)
            x = x_euler
            continue
        denoised_2 = ev(x_euler, sigma_next, i)
        dt = sigma_next - sigma_hat
        # average of the slopes (x - D) / sigma at both ends
        x = x + (x - denoised) * (0.5 * dt / sigma_hat) + (x_euler - denoised_2) * (0.5 * dt / sigma_next)
    return x


def _ddim(ev, x, sig, *, generator=None, eta=0.0):
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = ev(x, sigma, i)
        if eta == 0 or sigma_next == 0:
            x = _to_sigma(x, denoised, sigma, sigma_next)
            continue
        # DDIM's sigma_t(eta) mapped to the VE frame: the ancestral split of sigma_next.
        sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(sigma ** 2 - sigma_next ** 2) / sigma)
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        x = _to_sigma(x, denoised, sigma, sigma_down) + _noise_like(x, generator) * sigma_up
    return x


def _dpmpp_2m(ev, x, sig, *, generator=None):
    old_denoised = None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = ev(x, sigma, i)
        if old_denoised is None or sigma_next == 0:
            x = _to_sigma(x, denoised, sigma, sigma_next)
        else:
            h = math.log(sigma / sigma_next)
            r = math.log(sig[i - 1] / sigma) / h
            corrected = torch.lerp(denoised, old_denoised, -1.0 / (2 * r))
            x = _to_sigma(x, corrected, sigma, sigma_next)
        old_denoised = denoised
    return x


# ---------------------------------------------------------------------------------------------
# UniPC (data prediction). With lambda = -log sigma, a step s -> t has h = lambda_t - lambda_s and uses the
# model outputs m_s, m_{s-1}, ... through the divided differences D_k = (m_{s-k} - m_s) / r_k,
# r_k = (lambda_{s-k} - lambda_s) / h. All of it is host arithmetic on the schedule.
@dataclass
class _UniPCStep:
    ratio: float          # sigma_t / sigma_s
    rks: list             # r_1 .. r_{p-1}
    b_h: float            # B(h)
    rhos_p: list          # predictor weights of D_1 .. D_{p-1}
    rhos_c: list          # corrector weights of D_1 .. D_{p-1}, then of (m_t - m_s)


def _unipc_coefficients(lams, i, order, solver_type) -> _UniPCStep:
    h = lams[i + 1] - lams[i]
    rks = [(lams[i - k] - lams[i]) / h for k in range(1, order)]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else h_phi_1
    # b_j = j! phi_{j+1}(hh) h / B(h), by the recursion phi_{k+1} = (phi_k - 1/k!) / hh
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    rk_all = np.array(rks + [1.0])
    R = np.stack([rk_all ** j for j in range(order)])
    if order == 1:
        rhos_p, rhos_c = [], [0.5]
    else:
        rhos_p = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], np.array(b[:-1])))
        rhos_c = list(np.linalg.solve(R, np.array(b)))
    return _UniPCStep(math.exp(-h), rks, b_h, [float(v) for v in rhos_p], [float(v) for v in rhos_c])


def _unipc_base(x, m0, c: _UniPCStep):
    return torch.lerp(m0, x, c.ratio)  # sigma_t / sigma_s x - (e^{-h} - 1) m_s


def _unipc_predict(x, history, c: _UniPCStep):
    m0 = history[-1]
    out = _unipc_base(x, m0, c)
    for k, (rho, rk) in enumerate(zip(c.rhos_p, c.rks), start=1):
        out = out - (c.b_h * rho / rk) * (history[-1 - k] - m0)
    return out


def _unipc_correct(x_prev, history, m_t, c: _UniPCStep):
    m0 = history[-1]
    out = _unipc_base(x_prev, m0, c)
    for k, (rho, rk) in enumerate(zip(c.rhos_c[:-1], c.rks), start=1):
        out = out - (c.b_h * rho / rk) * (history[-1 - k] - m0)
    return out - (c.b_h * c.rhos_c[-1]) * (m_t - m0)


def _unipc(ev, x, sig, *, generator=None, order=2, solver_type="bh2", use_corrector=True, lower_order_final=True):
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
    n = len(sig) - 1
    lams = [-math.log(s) if s > 0 else math.inf for s in sig]
    orders, coeffs = [], []
    for i in range(n):
        p = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
        if sig[i + 1] == 0:
            p = 1  # h is infinite: only the first-order step (x = D) is defined
        orders.append(p)
        coeffs.append(_unipc_coefficients(lams, i, p, solver_type))
    history, x_prev = [], None
    for i in range(n):
        denoised = ev(x, sig[i], i)
        if use_corrector and i > 0:
            x = _unipc_correct(x_prev, history, denoised, coeffs[i - 1])
        history = (history + [denoised])[-order:]
        x_prev = x
        x = _unipc_predict(x, history, coeffs[i])
    return x


_SAMPLERS = {"euler": _euler, "heun": _heun, "ddim": _ddim, "dpmpp_2m": _dpmpp_2m, "unipc": _unipc}
_OPTIONS = {
    "euler": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "ddim": ("eta",),
    "dpmpp_2m": (),
    "unipc": ("order", "solver_type", "use_corrector", "lower_order_final"),
}


def evals_per_run(method: str, n_steps: int, ends_at_zero: bool = True) -> int:
    """Denoiser evaluations of `method` over n_steps steps (Heun: 2 per step except a final step to 0)."""
    if method == "heun":
        return 2 * n_steps - (1 if ends_at_zero else 0)
    return n_steps


def sample(denoiser, noise: torch.Tensor, sigmas, method: str = "heun", gaussian=None, skip: int = 0,
           sigma_skip: float | None = None, generator: torch.Generator | None = None, callback=None,
           **method_options) -> SampleResult:
    """Sample the probability-flow ODE from x_init = sigmas[0] * noise along `sigmas`.

    denoiser: denoiser(x, sigma [B]) -> x0_hat, or an object with .denoise (GaussianModel, GMM, ...).
    noise: [B, ...] standard normal draws. sigmas: descending VE schedule [N + 1] (tensor or sequence).
    method: one of METHODS; method_options: s_churn/s_tmin/s_tmax/s_noise (euler, heun; EDM churn with
        gamma = min(s_churn / steps run, sqrt(2) - 1), as k-diffusion on the schedule it runs), eta (ddim),
        order/solver_type/use_corrector/lower_order_final (unipc; the step to sigma = 0 is always first order).
    gaussian + skip=k (or sigma_skip): teleport x_init from sigmas[0] to sigmas[k] in closed form (one fused
        op, no network call) and run the sampler on sigmas[k:], restarting multistep history there.
        sigma_skip picks the largest k with sigmas[k] >= sigma_skip, i.e. the teleport never goes below
        sigma_skip; sigma_skip = 0 teleports all the way to sigmas[N] (choose_sigma_skip's result works too). `gaussian` is anything with
        .teleport(x, sigma_from, sigma_to): a GaussianModel, or GaussianFamily.for_labels(labels).
    Returns SampleResult(x, n_evals, sigma_start). See the module docstring on host synchronisation.
    """
    if method not in _SAMPLERS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    unknown = sorted(set(method_options) - set(_OPTIONS[method]))
    if unknown:
        raise TypeError(f"method {method!r} takes options {_OPTIONS[method]}, got unexpected {unknown}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 1:
        raise TypeError("noise must be a floating-point tensor of shape [B, ...]")
    sig = schedule_to_host(sigmas)
    if sig[0] <= 0:
        raise ValueError("sigmas[0] must be > 0")
    k = hybrid.resolve_skip(sig, skip=skip, sigma_skip=sigma_skip, gaussian=gaussian)
    x = hybrid.teleport_start(gaussian, noise, sig, k)
    ev = _Evaluator(denoiser, callback)
    tail = sig[k:]
    if len(tail) > 1:
        x = _SAMPLERS[method](ev, x, tail, generator=generator, **method_options)
    return SampleResult(x=x, n_evals=ev.n_evals, sigma_start=tail[0])

