"""Sampler accuracy with and without teleportation on GMM data (exact score known).

    python -m gsa_kernels.sampling.error_table [--out docs/sampling.md] [--samples 1000]

For a random float64 Gaussian mixture (gmm_reference.FullCovGMM) the PF-ODE from x_T = 80 eps is solved
with fine-step RK4 (the reference), then every sampler runs with the exact GMM denoiser for N steps on the
EDM schedule, teleporting the first k = round(f N) steps with the Gaussian of the mixture's exact mean and
covariance. Reported per cell: the median over samples of ||x - x_ref|| / r_data (r_data = RMS distance of
data from its mean), and the share of samples whose nearest mixture component differs from the
reference's ("mode flips": the sample ends in another cluster).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field

import torch

from .hybrid import choose_sigma_skip
from .gmm_reference import FullCovGMM, solve_pf_ode
from .samplers import METHODS, sample
from .schedules import karras_sigmas

DEFAULT_STEPS = (10, 18, 35)
DEFAULT_SKIPS = (0.0, 0.1, 0.2, 0.3, 0.4)


@dataclass
class ErrorTable:
    methods: tuple
    steps: tuple
    skips: tuple
    median_error: dict = field(default_factory=dict)   # (method, N, skip fraction) -> float
    flips: dict = field(default_factory=dict)          # (method, N, skip fraction) -> float
    n_evals: dict = field(default_factory=dict)        # (method, N, skip fraction) -> int
    auto: dict = field(default_factory=dict)           # (method, N) -> (k, median error, flips, n_evals)
    sigma_skip: float = math.nan
    tol: float = math.nan
    reference_error: float = math.nan
    setup: str = ""
    seconds: float = 0.0


def nearest_component(gmm: FullCovGMM, x: torch.Tensor) -> torch.Tensor:
    """Index of the component with the largest posterior weight at x (clean data)."""
    x2 = x.reshape(x.shape[0], -1).to(torch.float64)
    c = torch.einsum("bkd,kdr->bkr", x2[:, None, :] - gmm.means[None], gmm.vecs)
    var = gmm.lam[None].clamp_min(1e-12)
    return (gmm.log_weights - 0.5 * ((c * c / var).sum(-1) + torch.log(var).sum(-1))).argmax(1)


def sample_errors(x: torch.Tensor, ref: torch.Tensor, radius: float, gmm: FullCovGMM, ref_comp: torch.Tensor):
    """(median normalised per-sample error, fraction of mode flips)."""
    e = (x.to(torch.float64) - ref).norm(dim=1) / radius
    flips = (nearest_component(gmm, x) != ref_comp).double().mean()
    return float(e.median()), float(flips)


def run(dim: int = 16, n_components: int = 5, n_samples: int = 1000, steps=DEFAULT_STEPS, skips=DEFAULT_SKIPS,
        methods=METHODS, seed: int = 0, ref_steps: int = 1000, tol: float = 1e-4, sigma_max: float = 80.0,
        dtype=torch.float64) -> ErrorTable:
    t0 = time.time()
    gmm = FullCovGMM.random(dim, n_components, seed=seed)
    gaussian = gmm.gaussian(dtype)
    mean, cov = gmm.moments()
    radius = math.sqrt(float(torch.trace(cov)))
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(n_samples, dim, generator=g, dtype=torch.float64)
    ref = solve_pf_ode(gmm.denoise, noise * sigma_max, sigma_max, steps=ref_steps)
    ref_half = solve_pf_ode(gmm.denoise, noise * sigma_max, sigma_max, steps=ref_steps // 2)
    table = ErrorTable(tuple(methods), tuple(steps), tuple(skips), tol=tol)
    table.reference_error = float(((ref_half - ref).norm(dim=1) / radius).max())
    ref_comp = nearest_component(gmm, ref)
    noise = noise.to(dtype)
    data = gmm.sample(4000, torch.Generator().manual_seed(seed + 2)).to(dtype)
    table.sigma_skip = choose_sigma_skip(gaussian, gmm, data, tol=tol,
                                         generator=torch.Generator().manual_seed(seed + 3)).sigma_skip
    for method in methods:
        for n in steps:
            sig = karras_sigmas(n, sigma_max=sigma_max, dtype=torch.float64)
            for f in skips:
                res = sample(gmm, noise, sig, method=method, gaussian=gaussian, skip=round(f * n))
                key = (method, n, f)
                table.median_error[key], table.flips[key] = sample_errors(res.x, ref, radius, gmm, ref_comp)
                table.n_evals[key] = res.n_evals
            res = sample(gmm, noise, sig, method=method, gaussian=gaussian, sigma_skip=table.sigma_skip)
            k = sum(1 for s in sig.tolist() if s > res.sigma_start)
            table.auto[(method, n)] = (k, *sample_errors(res.x, ref, radius, gmm, ref_comp), res.n_evals)
    table.setup = (f"d = {dim}, K = {n_components} components (seed {seed}), {n_samples} samples, EDM schedule "
                   f"sigma in [0.002, {sigma_max:g}] with rho = 7, float64; reference: RK4 in log sigma with "
                   f"{ref_steps} steps (its error, by halving the steps: {table.reference_error:.1e})")
    table.seconds = time.time() - t0
    return table


def to_markdown(t: ErrorTable) -> str:
    head = "| sampler | N | " + " | ".join(f"skip {round(f * 100)}%" for f in t.skips) + \
           f" | auto (sigma_skip = {t.sigma_skip:.3g}) |"
    sep = "|" + "---|" * (len(t.skips) + 3)
    lines = ["Median error ||x - x_ref|| / r_data, mode flips in parentheses, [network evaluations]:", "",
             head, sep]
    for m in t.methods:
        for n in t.steps:
            cells = [f"{t.median_error[(m, n, f)]:.2e} ({100 * t.flips[(m, n, f)]:.1f}%) [{t.n_evals[(m, n, f)]}]"
                     for f in t.skips]
            k, e, fl, ne = t.auto[(m, n)]
            cells.append(f"{e:.2e} ({100 * fl:.1f}%) [{ne}], k = {k}")
            lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DOC_TEMPLATE = """# Sampling with analytical teleportation

`gsa_kernels.sampling` runs the usual diffusion samplers on the k-diffusion convention
`denoiser(x, sigma) -> x0_hat` (VE frame, docs/math.md section 1) and can skip their first steps by
teleporting the initial noise with the closed-form PF-ODE solution of a Gaussian model (docs/math.md section 4).

```python
import gsa_kernels as gk
from gsa_kernels.sampling import karras_sigmas, sample, choose_sigma_skip, VPDenoiser

g = gk.GaussianModel.fit(train_data)                 # mean + covariance eigenbasis of the data
denoiser = VPDenoiser(unet, alphas_cumprod)         # eps-/v-prediction network -> denoiser
res = sample(denoiser, torch.randn(16, 3, 32, 32), karras_sigmas(18), method="heun", gaussian=g, skip=4)
res.x, res.n_evals, res.sigma_start                 # 27 network calls instead of 35

choice = choose_sigma_skip(g, gk.GMM.fit(train_data, 10, 32), train_data, tol=1e-4)
res = sample(denoiser, noise, karras_sigmas(18), method="dpmpp_2m", gaussian=g, sigma_skip=choice.sigma_skip)
```

Methods: `euler`, `heun` (EDM, optional churn `s_churn/s_tmin/s_tmax/s_noise`), `ddim` (`eta`),
`dpmpp_2m` (DPM-Solver++(2M)), `unipc` (bh2 or bh1, `order` 2 or 3). They agree with k-diffusion's
`sample_euler`, `sample_heun`, `sample_euler_ancestral`, `sample_dpmpp_2m` and with diffusers' DDIM,
DPM-Solver++ and UniPC schedulers to float32 rounding (tests/test_sampling.py). A step makes no host
synchronisation (coefficients are host floats computed from the schedule before the loop), so steps can
be captured in CUDA graphs.

- `skip=k` teleports from `sigmas[0]` to `sigmas[k]`; `sigma_skip=s` teleports to the lowest schedule level
  `>= s`. Multistep solvers restart their history there. `n_evals` counts the network calls.
- The package's models are denoisers too: `sample(g, noise, sigmas)` gives analytic samples.
- Class-conditional: `GaussianFamily.fit(data, labels)` and `gaussian=family.for_labels(y)` teleport a
  mixed-class batch in one call.
- diffusers: `gsa_kernels.integrations.sample_with_scheduler(unet, scheduler, noise, 30, gaussian=g, skip=6)`
  runs DDIM/Euler/DPM-Solver/UniPC/FlowMatch schedulers from the teleported start (`set_begin_index`,
  `init_noise_sigma` and VP/VE/flow scaling handled); `pipeline_kwargs(pipe, g, noise, 30, skip=6)` returns
  `latents=` plus `timesteps=`/`sigmas=` for pipelines that accept them.
- k-diffusion: `gsa_kernels.integrations.sample_k_diffusion(K.sample_dpmpp_2m, model, noise, sigmas,
  gaussian=g, skip=4)` runs any `sample_*` function from the teleported start.

## Error table: GMM data with exact score

Generated by `python -m gsa_kernels.sampling.error_table` ({seconds:.0f} s on the CPU). {setup}.
The auto column uses `choose_sigma_skip(tol={tol:g})` with the mixture as the reference model.

{table}

Reading it: teleporting over the first 10-20% of the steps leaves the median error unchanged to two or
three digits for every sampler and N while removing that share of the network evaluations; at 30% the
worst case is +14% (UniPC, N = 35). At 40% (sigma_skip of about 4 to 5, below the separation of the
clusters, where the Gaussian no longer explains the mixture's score) the error of the accurate
second-order runs (N = 35) grows two- to five-fold and about 1% of the samples end in another cluster.
At N = 10 a deep teleport can even lower the median error, because it replaces the least accurate large
steps with the exact solution of the Gaussian part of the dynamics, but the mode flips show the price.
DDIM with eta = 0 is the Euler step in the VE frame, so its rows equal Euler's. The automatic choice
(explained variance >= 1 - 1e-4) teleports over 20-30% of the steps for at most +14% error.
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("docs", "sampling.md"))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--ref-steps", type=int, default=1000)
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args(argv)
    t = run(n_samples=args.samples, ref_steps=args.ref_steps, tol=args.tol)
    text = DOC_TEMPLATE.format(seconds=t.seconds, setup=t.setup, tol=t.tol, table=to_markdown(t))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(to_markdown(t))
    print(f"wrote {args.out} ({t.seconds:.0f} s)")


if __name__ == "__main__":
    main()
