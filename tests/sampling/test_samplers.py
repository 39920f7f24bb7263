"""gsa_kernels.sampling: schedules, samplers (against diffusers' scheduler math) and the hybrid sampler on
Gaussian data (tests/sampling/test_teleport_models.py: the sigma_skip chooser, families, adapters)."""
import math

import pytest
import torch

from gsa_kernels.gaussian import reference as gref
from gsa_kernels.sampling import (METHODS, evals_per_run, flow_sigmas, flow_ts, frame_to_sigmas, karras_sigmas,
                                  linear_alphas_cumprod, sample, sigma_to_timestep, sigmas_to_frame,
                                  timestep_to_sigma, vp_sigmas, vp_timesteps)
from helpers import HostSyncDetector, gaussian_model, nonlinear_denoiser, reference_teleport, rel_err


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Schedules
def test_karras_schedule_formula_and_tail():
    s = karras_sigmas(18, 0.002, 80.0, 7.0, dtype=torch.float64)
    assert s.shape == (19,) and s[-1] == 0 and abs(s[0] - 80) < 1e-12 and abs(s[-2] - 0.002) < 1e-15
    root = s[:-1] ** (1 / 7)
    assert torch.allclose(root.diff(), root.diff()[:1].expand(17), rtol=1e-10)  # linear in sigma^(1/rho)
    tail = karras_sigmas(18 - 5, 0.002, float(s[5]), 7.0, dtype=torch.float64)
    assert rel_err(tail, s[5:]) < 1e-12  # docs/math.md section 4: the tail is again a Karras schedule
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(10, sigma_min=90.0)
    with pytest.raises(ValueError, match="n must be"):
        karras_sigmas(0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_vp_timesteps_and_sigmas_match_diffusers_ddim(spacing):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sch.set_timesteps(12)
    ts = vp_timesteps(12, 1000, spacing, steps_offset=1 if spacing == "leading" else 0)
    assert torch.equal(ts, sch.timesteps)
    abar = sch.alphas_cumprod[ts].double()
    assert rel_err(vp_sigmas(sch.alphas_cumprod, ts, dtype=torch.float64)[:-1], ((1 - abar) / abar).sqrt()) < 1e-6
    assert rel_err(linear_alphas_cumprod(1000), sch.alphas_cumprod.double()) < 1e-5


def test_sigma_timestep_interpolation_matches_diffusers_and_round_trips():
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.EulerDiscreteScheduler()
    abar = sch.alphas_cumprod
    log_sigmas = torch.log(((1 - abar) / abar) ** 0.5).numpy()
    sig = torch.exp(torch.empty(50, dtype=torch.float64).uniform_(math.log(0.02), math.log(150.0)))
    t = sigma_to_timestep(sig, abar)
    t_ref = torch.tensor([float(sch._sigma_to_t(s, log_sigmas)) for s in sig.numpy()], dtype=torch.float64)
    assert (t - t_ref).abs().max() < 1e-3
    assert rel_err(timestep_to_sigma(t, abar), sig) < 1e-9


def test_flow_schedule_and_frame_conversions():
    t = flow_ts(8, t_max=1.0, shift=3.0)
    u = torch.linspace(1, 0, 9, dtype=torch.float64)
    assert rel_err(t, 3 * u / (1 + 2 * u)) < 1e-14 and t[0] == 1 and t[-1] == 0
    s = flow_sigmas(8, t_max=0.99, shift=3.0, dtype=torch.float64)
    tt = flow_ts(8, t_max=0.99, shift=3.0)
    assert rel_err(s, tt / (1 - tt)) < 1e-14
    with pytest.raises(ValueError, match="t_max"):
        flow_sigmas(8, t_max=1.0)
    sig = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    for frame in ("ve", "vp", "flow"):
        assert rel_err(frame_to_sigmas(sigmas_to_frame(sig, frame), frame), sig) < 1e-12
    abar = sigmas_to_frame(sig, "vp")
    assert rel_err(abar, 1 / (1 + sig ** 2)) < 1e-15  # x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps
    assert rel_err(sigmas_to_frame(sig, "flow"), sig / (1 + sig)) < 1e-15
    with pytest.raises(ValueError, match="frame"):
        sigmas_to_frame(sig, "edm")


# ---------------------------------------------------------------------------------------------
# Samplers against diffusers' scheduler arithmetic (the same ODE solvers in the VP frame)
def _run_diffusers_scheduler(sch, n, denoise, noise, **step_kwargs):
    """A diffusers loop whose 'network' returns the eps that makes x0 = denoise(x_ve, sigma)."""
    sch.set_timesteps(n)
    x = noise * float(getattr(sch, "init_noise_sigma", 1.0))
    for i, t in enumerate(sch.timesteps):
        if getattr(sch, "sigmas", None) is not None:
            s = float(sch.sigmas[i])
        else:
            a = float(sch.alphas_cumprod[t])
            s = math.sqrt((1 - a) / a)
        x_ve = x * math.sqrt(1 + s * s)
        x0 = denoise(x_ve, torch.full((x.shape[0],), s, dtype=x.dtype))
        x = sch.step((x_ve - x0) / s, t, x, **step_kwargs).prev_sample
    s_end = float(sch.sigmas[-1]) if getattr(sch, "sigmas", None) is not None else 0.0
    return x * math.sqrt(1 + s_end * s_end)  # back to the VE frame


@pytest.mark.parametrize("case", ["ddim", "ddim_eta", "dpmpp_2m", "unipc2", "unipc3", "unipc3_bh1"])
def test_samplers_match_diffusers_schedulers(case):
    diffusers = pytest.importorskip("diffusers")
    model = gaussian_model()
    denoise = nonlinear_denoiser(model)
    noise = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    opts, step_kwargs = {}, {}
    if case.startswith("ddim"):
        sch, method = diffusers.DDIMScheduler(clip_sample=False), "ddim"
        if case == "ddim_eta":
            opts = {"eta": 0.6, "generator": torch.Generator().manual_seed(3)}
            step_kwargs = {"eta": 0.6, "generator": torch.Generator().manual_seed(3)}
    elif case == "dpmpp_2m":
        sch, method = diffusers.DPMSolverMultistepScheduler(solver_order=2), "dpmpp_2m"
    else:
        order, kind = int(case[5]), ("bh1" if case.endswith("bh1") else "bh2")
        # (diffusers' bh1 turns the final step to sigma = 0 into NaN (B(h) = -inf times 0): end at sigma_min there)
        sch = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type=kind,
                                                final_sigmas_type="sigma_min" if kind == "bh1" else "zero")
        method, opts = "unipc", {"order": order, "solver_type": kind}
    for n in (6, 11):
        ref = _run_diffusers_scheduler(sch, n, denoise, noise, **step_kwargs)
        if getattr(sch, "sigmas", None) is not None:
            sig = sch.sigmas.double()
        else:
            sig = vp_sigmas(sch.alphas_cumprod, sch.timesteps, dtype=torch.float64)
        # diffusers starts from the VP prior x_vp = noise, i.e. x_ve = sqrt(1 + sigma_0^2) noise
        start = noise * math.sqrt(1 + float(sig[0]) ** 2) / float(sig[0])
        if "generator" in opts:
            opts["generator"].manual_seed(3)
            step_kwargs["generator"].manual_seed(3)
            ref = _run_diffusers_scheduler(sch, n, denoise, noise, **step_kwargs)
        out = sample(denoise, start, sig, method=method, **opts)
        assert out.n_evals == n
        assert rel_err(out.x, ref) < 1e-6, (case, n)


def test_ddim_eta0_is_euler_and_unipc_order1_is_first_order():
    model = gaussian_model()
    denoise = nonlinear_denoiser(model)
    noise = torch.randn(5, 8, dtype=torch.float64)
    sig = karras_sigmas(9, dtype=torch.float64)
    euler = sample(denoise, noise, sig, method="euler").x
    assert rel_err(sample(denoise, noise, sig, method="ddim").x, euler) < 1e-12
    assert rel_err(sample(denoise, noise, sig, method="unipc", order=1, use_corrector=False).x, euler) < 1e-12
    # without the corrector, order-2 UniP differs from Euler: the options reach the solver
    assert rel_err(sample(denoise, noise, sig, method="unipc", order=2, use_corrector=False).x, euler) > 1e-4


# ---------------------------------------------------------------------------------------------
# Gaussian data: the samplers integrate the exact Gaussian PF-ODE; the teleport is its exact solution.
@pytest.mark.parametrize("method", METHODS)
def test_teleport_to_sigma_min_then_final_step_is_exact(method):
    model = gaussian_model()
    noise = torch.randn(16, 8, dtype=torch.float64)
    n = 12
    sig = karras_sigmas(n, dtype=torch.float64)
    out = sample(model, noise, sig, method=method, gaussian=model, skip=n - 1)
    assert out.n_evals == 1 and out.sigma_start == pytest.approx(0.002)
    exact = reference_teleport(model, noise * 80.0, 80.0, 0.0)
    # the final step D(x; sigma_min) differs from the exact flow to 0 by the factor sqrt(l / (l + sigma_min^2))
    lam_min = min(float(model.eigvals.min()), float(model.lam_perp))
    assert rel_err(out.x, exact) < 0.002 ** 2 / lam_min
    assert rel_err(sample(model, noise, sig, method=method, gaussian=model, skip=n).x, exact) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_hybrid_never_worse_than_full_sampler_on_gaussian_data(method):
    model = gaussian_model(lam_range=(0.02, 9.0))
    noise = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    exact = reference_teleport(model, noise * 80.0, 80.0, 0.0)
    for n in (8, 18):
        sig = karras_sigmas(n, dtype=torch.float64)
        errs = [rel_err(sample(model, noise, sig, method=method, gaussian=model, skip=k).x, exact)
                for k in range(n)]
        assert errs[0] > 1e-5  # the full sampler has a discretisation error to beat
        assert max(errs[1:]) <= errs[0] * (1 + 1e-6), (n, errs)


def test_package_models_are_denoisers_analytic_sampling():
    model = gaussian_model()
    noise = torch.randn(32, 8, dtype=torch.float64)
    exact = reference_teleport(model, noise * 80.0, 80.0, 0.0)
    out = sample(model, noise, karras_sigmas(80, dtype=torch.float64), method="heun")
    assert out.n_evals == 159
    err = rel_err(out.x, exact)
    assert err < 3e-3
    # second order: twice the steps, about a quarter of the error
    assert rel_err(sample(model, noise, karras_sigmas(160, dtype=torch.float64), method="heun").x, exact) < err / 3


@pytest.mark.parametrize("method", METHODS)
def test_n_evals_and_sigma_skip_resolution(method):
    model = gaussian_model(dtype=torch.float32)
    noise = torch.randn(4, 2, 4)  # any trailing shape with prod = d
    n = 10
    sig = karras_sigmas(n)
    s = sig.tolist()
    for k in (0, 3, 9):
        out = sample(model, noise, sig, method=method, gaussian=model, skip=k)
        assert out.n_evals == evals_per_run(method, n - k) and out.sigma_start == s[k]
        assert out.x.shape == noise.shape and torch.isfinite(out.x).all()
    for target, k in ((s[4], 4), (s[4] * 0.999, 4), (s[4] * 1.001, 3), (0.0, n), (math.inf, 0), (1e9, 0)):
        assert sample(model, noise, sig, method=method, gaussian=model, sigma_skip=target).sigma_start == s[k]


def test_bad_arguments_name_the_argument():
    model = gaussian_model(dtype=torch.float32)
    noise = torch.randn(4, 8)
    sig = karras_sigmas(5)
    with pytest.raises(ValueError, match="method"):
        sample(model, noise, sig, method="plms")
    with pytest.raises(TypeError, match="eta"):
        sample(model, noise, sig, method="heun", eta=1.0)
    with pytest.raises(ValueError, match="sigmas must be strictly decreasing"):
        sample(model, noise, sig.flip(0), method="euler")
    with pytest.raises(ValueError, match="gaussian"):
        sample(model, noise, sig, skip=2)
    with pytest.raises(ValueError, match="skip"):
        sample(model, noise, sig, gaussian=model, skip=6)
    with pytest.raises(ValueError, match="either skip or sigma_skip"):
        sample(model, noise, sig, gaussian=model, skip=1, sigma_skip=3.0)
    with pytest.raises(ValueError, match="sigma_skip"):
        sample(model, noise, sig, gaussian=model, sigma_skip=-1.0)
    with pytest.raises(ValueError, match="order"):
        sample(model, noise, sig, method="unipc", order=4)
    with pytest.raises(TypeError, match="noise"):
        sample(model, noise.tolist(), sig)
    with pytest.raises(TypeError, match="denoiser"):
        sample(object(), noise, sig)


# ---------------------------------------------------------------------------------------------
# Stochastic options
def test_churn_and_eta_are_reproducible_and_sample_the_data_distribution():
    model = gaussian_model(d=3, r=3, lam_perp=0.0, lam_range=(0.2, 2.0))
    noise = torch.randn(4000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sig = karras_sigmas(25, dtype=torch.float64)
    for method, opts in (("heun", {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0}), ("euler", {"s_churn": 10.0}),
                         ("ddim", {"eta": 1.0})):
        a = sample(model, noise, sig, method=method, generator=torch.Generator().manual_seed(1), **opts).x
        b = sample(model, noise, sig, method=method, generator=torch.Generator().manual_seed(1), **opts).x
        c = sample(model, noise, sig, method=method, generator=torch.Generator().manual_seed(2), **opts).x
        assert torch.equal(a, b) and rel_err(a, c) > 0.05, method
    deterministic = sample(model, noise, sig, method="heun").x
    assert torch.equal(sample(model, noise, sig, method="heun", s_churn=0.0).x, deterministic)
    # EDM's stochastic sampler keeps the data distribution (4000 samples: ~4% sampling error of the covariance)
    cov = model.basis @ torch.diag(model.eigvals) @ model.basis.T
    churned = sample(model, noise, karras_sigmas(100, dtype=torch.float64), method="heun", s_churn=20.0, s_tmin=0.05,
                     s_tmax=50.0, generator=torch.Generator().manual_seed(1)).x
    assert rel_err(torch.cov(churned.T), cov) < 0.06 and rel_err(churned.mean(0), model.mean) < 0.05
    assert rel_err(churned, deterministic) > 0.1  # it is a different sampler


@pytest.mark.parametrize("method,opts", [("euler", {"s_churn": 5.0}), ("heun", {"s_churn": 5.0}), ("ddim", {"eta": 0.5}),
                                         ("dpmpp_2m", {}), ("unipc", {"order": 3})])
def test_sampler_steps_make_no_host_synchronisation(method, opts):
    model = gaussian_model(dtype=torch.float32)
    args = (model.mean, model.basis, model.eigvals, model.lam_perp)

    def denoiser(x, sigma):  # pure tensor ops, so anything flagged comes from the sampler
        return gref.gaussian_denoise(x, *args, sigma)

    sig = karras_sigmas(8).tolist()  # a host schedule: nothing to read back
    noise = torch.randn(4, 8)
    gen = torch.Generator().manual_seed(0)
    with HostSyncDetector() as det:
        out = sample(denoiser, noise, sig, method=method, generator=gen, **opts)
    assert det.seen == [] and out.n_evals == evals_per_run(method, 8)
