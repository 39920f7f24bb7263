"""Integrations against the real packages: k-diffusion's sampling module and diffusers' schedulers with a
small random-init UNet2DModel on the CPU (no downloads)."""
import math

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels.integrations import pipeline_kwargs, sample_k_diffusion, sample_with_scheduler, teleport_latents
from gsa_kernels.integrations.diffusers import scheduler_frame, scheduler_noise_level
from gsa_kernels.sampling import VPDenoiser, karras_sigmas, sample

from helpers import reference_teleport, rel_err


pytestmark = pytest.mark.usefixtures("one_thread")


def _gaussian(d, r, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    eig = torch.exp(torch.empty(r, dtype=torch.float64).uniform_(math.log(0.05), math.log(3.0), generator=g))
    return gk.GaussianModel((0.3 * torch.randn(d, generator=g, dtype=torch.float64)).to(dtype), basis.to(dtype),
                            eig.to(dtype), 0.02)


class _Recorder:
    """Wraps a denoiser or network and records the inputs of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, **kwargs):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        with torch.no_grad():
            return self.fn(x, t, **kwargs)


# ---------------------------------------------------------------------------------------------
# k-diffusion: the real package (its sampling module). `import k_diffusion` also imports torchvision, whose
# PyPI wheels load only beside a CUDA build of torch; the CI matrix environment "torch211-cu130" installs it
# (requirements/k-diffusion.txt) and runs these tests there.
@pytest.fixture(scope="module")
def K():
    return pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is not importable here "
                               "(pip install -r requirements/k-diffusion.txt beside a torch that torchvision supports)")


def _kd_denoiser(model):
    def denoise(x, sigma):
        return model.denoise(x, sigma) + 0.3 * torch.tanh(2 * x) / (1 + sigma.reshape(-1, 1))
    return denoise


@pytest.mark.k_diffusion
@pytest.mark.parametrize("skip", [0, 3])
@pytest.mark.parametrize("method,kd_name", [("euler", "sample_euler"), ("heun", "sample_heun"),
                                            ("dpmpp_2m", "sample_dpmpp_2m")])
def test_samplers_match_k_diffusion(K, method, kd_name, skip):
    model = _gaussian(8, 5)
    den = _kd_denoiser(model)
    noise = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    sig = karras_sigmas(10)
    ours = sample(den, noise, sig, method=method, gaussian=model, skip=skip)
    theirs = sample_k_diffusion(getattr(K, kd_name), den, noise, sig, gaussian=model, skip=skip)
    assert rel_err(ours.x, theirs.x) < 1e-6
    assert ours.n_evals == theirs.n_evals and ours.sigma_start == theirs.sigma_start
    if skip == 0:  # and the plain k-diffusion call, with no wrapper at all
        assert rel_err(ours.x, getattr(K, kd_name)(den, noise * sig[0], sig, disable=True)) < 1e-6


@pytest.mark.k_diffusion
def test_ddim_eta_matches_k_diffusion_euler_ancestral(K):
    model = _gaussian(8, 5)
    den = _kd_denoiser(model)
    noise = torch.randn(6, 8)
    sig = karras_sigmas(10)
    ours = sample(den, noise, sig, method="ddim", eta=0.7, generator=torch.Generator().manual_seed(1)).x
    g = torch.Generator().manual_seed(1)
    theirs = K.sample_euler_ancestral(den, noise * sig[0], sig, eta=0.7, disable=True,
                                      noise_sampler=lambda s, t: torch.randn(noise.shape, generator=g))
    assert rel_err(ours, theirs) < 1e-6


@pytest.mark.k_diffusion
@pytest.mark.parametrize("kd_name", ["sample_lms", "sample_dpm_2", "sample_dpmpp_2s_ancestral"])
def test_k_diffusion_wrapper_starts_any_sampler_at_the_teleported_point(K, kd_name):
    model = _gaussian(8, 5)
    rec = _Recorder(_kd_denoiser(model))
    noise = torch.randn(6, 8)
    sig = karras_sigmas(12)
    res = sample_k_diffusion(getattr(K, kd_name), rec, noise, sig, gaussian=model, skip=4)
    x_first, s_first = rec.calls[0]
    assert torch.all(s_first == sig[4]) and res.sigma_start == float(sig[4])
    assert rel_err(x_first, reference_teleport(model, noise * 80.0, 80.0, float(sig[4]))) < 1e-5
    assert res.n_evals == len(rec.calls) > 0 and torch.isfinite(res.x).all()


@pytest.mark.k_diffusion
def test_k_diffusion_wrapper_adaptive_sampler_with_sigma_skip(K):
    model = _gaussian(8, 5)
    rec = _Recorder(_kd_denoiser(model))
    noise = torch.randn(6, 8)
    res = sample_k_diffusion(K.sample_dpm_fast, rec, noise, gaussian=model, sigma_min=0.002, sigma_max=80.0,
                             sigma_skip=5.0, n=8)
    x_first, s_first = rec.calls[0]
    assert res.sigma_start == 5.0 and torch.allclose(s_first, torch.tensor(5.0))
    assert rel_err(x_first, reference_teleport(model, noise * 80.0, 80.0, 5.0)) < 1e-5
    with pytest.raises(ValueError, match="sigma_min"):
        sample_k_diffusion(K.sample_dpm_fast, rec, noise, gaussian=model, sigma_skip=5.0, n=8)
    with pytest.raises(ValueError, match="sigmas"):
        sample_k_diffusion(K.sample_euler, rec, noise, gaussian=model, skip=2)


# ---------------------------------------------------------------------------------------------
# diffusers
try:
    import diffusers
except ImportError:  # pragma: no cover
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")

N_STEPS, SKIP = 10, 3
SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(clip_sample=False),
    "euler": lambda: diffusers.EulerDiscreteScheduler(),
    "euler_karras": lambda: diffusers.EulerDiscreteScheduler(use_karras_sigmas=True),
    "dpmsolver": lambda: diffusers.DPMSolverMultistepScheduler(),
    "unipc": lambda: diffusers.UniPCMultistepScheduler(),
    "flow": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
}
FRAMES = {"ddim": "vp", "euler": "ve", "euler_karras": "ve", "dpmsolver": "vp", "unipc": "vp", "flow": "flow"}


@pytest.fixture(scope="module")
def unet():
    if diffusers is None:
        pytest.skip("diffusers is not installed")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.fixture(scope="module")
def latent_gaussian():
    return _gaussian(2 * 8 * 8, 24, seed=1)


def _noise(seed=0):
    return torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(seed))


def _expected_first_input(name, noise, model, k):
    """The network input of the first call, computed independently: float64 teleport of the scheduler's
    initial latents, scaled into the frame the network sees (VP for the UNet, flow for flow models)."""
    sch = SCHEDULERS[name]()
    sch.set_timesteps(N_STEPS)
    frame = FRAMES[name]
    if frame == "flow":
        t0, tk = float(sch.sigmas[0]), float(sch.sigmas[k])
        big = 1e6 if t0 == 1.0 else t0 / (1 - t0)  # t = 1: the x_ve = sigma * noise limit
        x_ve = noise.double() * (big if t0 == 1.0 else 1 / (1 - t0))
        return reference_teleport(model, x_ve, big, tk / (1 - tk)) * (1 - tk), sch.timesteps[k]
    s0, _ = scheduler_noise_level(sch, 0)
    sk, _ = scheduler_noise_level(sch, k)
    x_sched0 = noise.double() * float(getattr(sch, "init_noise_sigma", 1.0))
    x_ve0 = x_sched0 if frame == "ve" else x_sched0 * math.sqrt(1 + s0 * s0)
    return reference_teleport(model, x_ve0, s0, sk) / math.sqrt(1 + sk * sk), sch.timesteps[k]


@needs_diffusers
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_diffusers_scheduler_first_call_at_sigma_skip_and_n_minus_k_calls(name, unet, latent_gaussian):
    sch = SCHEDULERS[name]()
    rec = _Recorder(unet)
    noise = _noise()
    res = sample_with_scheduler(rec, sch, noise, N_STEPS, gaussian=latent_gaussian, skip=SKIP)
    assert scheduler_frame(sch) == FRAMES[name]
    assert res.n_evals == len(rec.calls) == N_STEPS - SKIP
    expected_x, expected_t = _expected_first_input(name, noise, latent_gaussian, SKIP)
    x_first, t_first = rec.calls[0]
    assert torch.allclose(t_first.double(), expected_t.double().expand(3))
    assert rel_err(x_first, expected_x) < 1e-5
    assert res.x.shape == noise.shape and torch.isfinite(res.x).all()


@needs_diffusers
@pytest.mark.parametrize("name", ["euler", "dpmsolver", "flow"])
def test_diffusers_without_skip_is_the_plain_scheduler_loop(name, unet):
    noise = _noise(1)
    res = sample_with_scheduler(lambda x, t: unet(x, t), SCHEDULERS[name](), noise, 6)
    sch = SCHEDULERS[name]()
    sch.set_timesteps(6)
    x = noise * getattr(sch, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in sch.timesteps:
            inp = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
            x = sch.step(unet(inp, t).sample, t, x).prev_sample
    assert res.n_evals == 6 and torch.equal(res.x, x)


@needs_diffusers
@pytest.mark.parametrize("method,name", [("dpmpp_2m", "dpmsolver"), ("unipc", "unipc"), ("ddim", "ddim")])
def test_own_samplers_with_vp_adapter_match_diffusers_hybrid(method, name, unet, latent_gaussian):
    """The same hybrid run two ways: diffusers scheduler + UNet, and gsa samplers + VPDenoiser(UNet)."""
    sch = SCHEDULERS[name]()
    noise = _noise(2)
    with torch.no_grad():
        ref = sample_with_scheduler(lambda x, t: unet(x, t), sch, noise, N_STEPS, gaussian=latent_gaussian,
                                    skip=SKIP)
        sig = [scheduler_noise_level(sch, i)[0] for i in range(N_STEPS)] + [0.0]
        den = VPDenoiser(unet, sch.alphas_cumprod)
        start = noise * math.sqrt(1 + sig[0] ** 2) / sig[0]  # the VP prior x_vp = noise in the VE frame
        ours = sample(den, start, sig, method=method, gaussian=latent_gaussian, skip=SKIP)
    assert ours.n_evals == ref.n_evals == N_STEPS - SKIP
    assert rel_err(ours.x, ref.x) < 1e-4


@needs_diffusers
def test_teleport_latents_sigma_skip_and_begin_index(latent_gaussian):
    sch = diffusers.DPMSolverMultistepScheduler()
    sch.set_timesteps(N_STEPS)
    target = float(sch.sigmas[4])
    start = teleport_latents(sch, latent_gaussian, _noise(), sigma_skip=target * 0.999)
    assert start.skip == 4 and start.begin_index == 4 and sch.begin_index == 4
    assert torch.equal(start.timesteps, sch.timesteps[4:]) and start.sigma == pytest.approx(target)
    with pytest.raises(ValueError, match="set_timesteps"):
        teleport_latents(diffusers.EulerDiscreteScheduler(), latent_gaussian, _noise(), skip=2)


class _TinyPipeline:
    """The text-to-image pipeline pattern (retrieve_timesteps, prepare_latents, denoising loop) without a
    text encoder: set_timesteps(timesteps=/sigmas=), latents * init_noise_sigma, scale, network, step."""

    def __init__(self, unet, scheduler):
        self.unet, self.scheduler, self.calls = unet, scheduler, 0

    @torch.no_grad()
    def __call__(self, num_inference_steps=N_STEPS, timesteps=None, sigmas=None, latents=None):
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps)
        elif sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas)
        else:
            self.scheduler.set_timesteps(num_inference_steps)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        for t in self.scheduler.timesteps:
            inp = self.scheduler.scale_model_input(latents, t) if hasattr(self.scheduler, "scale_model_input") \
                else latents
            self.calls += 1
            latents = self.scheduler.step(self.unet(inp, t).sample, t, latents).prev_sample
        return latents


@needs_diffusers
@pytest.mark.parametrize("name,arg", [("euler", "timesteps"), ("euler_karras", "sigmas"), ("dpmsolver", "timesteps"),
                                      ("flow", "sigmas")])
def test_pipeline_kwargs_reproduce_the_hybrid_run(name, arg, unet, latent_gaussian):
    noise = _noise(3)
    pipe = _TinyPipeline(unet, SCHEDULERS[name]())
    kwargs = pipeline_kwargs(pipe, latent_gaussian, noise, N_STEPS, skip=SKIP)
    assert set(kwargs) == {"latents", arg}
    out = pipe(**kwargs)
    with torch.no_grad():
        ref = sample_with_scheduler(lambda x, t: unet(x, t), SCHEDULERS[name](), noise, N_STEPS,
                                    gaussian=latent_gaussian, skip=SKIP)
    assert pipe.calls == N_STEPS - SKIP
    assert rel_err(out, ref.x) < 1e-5


@needs_diffusers
def test_pipeline_kwargs_refuses_schedulers_without_custom_schedules(latent_gaussian):
    with pytest.raises(ValueError, match="sample_with_scheduler"):
        pipeline_kwargs(SCHEDULERS["ddim"](), latent_gaussian, _noise(), N_STEPS, skip=SKIP)
    with pytest.raises(ValueError, match="sample_with_scheduler"):
        pipeline_kwargs(SCHEDULERS["unipc"](), latent_gaussian, _noise(), N_STEPS, skip=SKIP)
