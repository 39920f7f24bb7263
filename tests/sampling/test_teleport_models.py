"""gsa_kernels.sampling beyond the solvers: the sigma_skip chooser (on GMM data with an exact denoiser),
class-conditional teleport (GaussianFamily) and the network adapters."""
import math

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels.sampling import (FlowDenoiser, GaussianFamily, VPDenoiser, choose_sigma_skip, karras_sigmas,
                                  linear_alphas_cumprod, sample, timestep_to_sigma)
from helpers import gaussian_model, import_example, reference_teleport, rel_err


FullCovGMM = import_example("gmm_reference").FullCovGMM

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# sigma_skip chooser
def test_choose_sigma_skip():
    gmm = FullCovGMM.random(dim=6, n_components=3, seed=1)
    g = gmm.gaussian(torch.float64)
    data = gmm.sample(600, torch.Generator().manual_seed(0))
    grid = torch.logspace(math.log10(80), math.log10(0.05), 16, dtype=torch.float64)
    # a model agrees with itself everywhere: teleport down to the smallest level of the grid
    same = choose_sigma_skip(g, g, data, tol=1e-3, sigmas=grid, generator=torch.Generator().manual_seed(1))
    assert same.sigma_skip == pytest.approx(0.05) and (same.explained_variance > 1 - 1e-9).all()
    picks = [choose_sigma_skip(g, gmm, data, tol=tol, sigmas=grid, generator=torch.Generator().manual_seed(1))
             for tol in (1e-4, 1e-2, 0.3)]
    sig = [p.sigma_skip for p in picks]
    assert 0.05 < sig[2] <= sig[1] <= sig[0] < 80, sig  # looser tolerance, deeper teleport
    assert sig[2] < sig[0]
    ev = picks[0].explained_variance
    assert ev[0] > 0.9999 and ev[-1] < 0.9  # the Gaussian explains the mixture at high noise only
    with pytest.raises(ValueError, match="tol"):
        choose_sigma_skip(g, gmm, data, tol=1.5)


def test_choose_sigma_skip_with_fitted_package_models():
    """The intended workflow: Gaussian and GMM fitted to the same data; the choice feeds sample()."""
    gmm = FullCovGMM.random(dim=6, n_components=3, seed=1)
    data = gmm.sample(1500, torch.Generator().manual_seed(0)).float()
    g = gk.GaussianModel.fit(data)
    grid = torch.logspace(math.log10(80), math.log10(0.05), 24, dtype=torch.float64)
    exact = choose_sigma_skip(gmm.gaussian(), gmm, data, sigmas=grid, generator=torch.Generator().manual_seed(1))
    fitted = choose_sigma_skip(g, gk.GMM.fit(data, 3, rank=6), data, sigmas=grid,
                               generator=torch.Generator().manual_seed(1))
    ratio = float(grid[0] / grid[1])
    assert exact.sigma_skip / ratio <= fitted.sigma_skip <= exact.sigma_skip * ratio  # within one grid step
    sig = karras_sigmas(18)
    res = sample(gk.GMM.fit(data, 3, rank=6), torch.randn(8, 6), sig, method="unipc", gaussian=g, sigma_skip=fitted)
    k = sum(1 for v in sig.tolist() if v >= fitted.sigma_skip) - 1
    assert res.n_evals == 18 - k and 0 < k < 18 and res.sigma_start >= fitted.sigma_skip


# ---------------------------------------------------------------------------------------------
# Class-conditional teleport
def test_gaussian_family_matches_per_class_models():
    models = [gaussian_model(d=6, r=r, lam_perp=lp, seed=s) for s, (r, lp) in enumerate([(3, 0.1), (6, 0.0), (2, 0.3)])]
    family = GaussianFamily.from_models(models)
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    x = torch.randn(7, 2, 3, dtype=torch.float64) * 20
    s0 = torch.rand(7, dtype=torch.float64) * 50 + 10
    s1 = torch.rand(7, dtype=torch.float64) * 5
    loop_t = torch.stack([models[c].teleport(x[i:i + 1], s0[i:i + 1], s1[i:i + 1])[0] for i, c in enumerate(labels)])
    loop_d = torch.stack([models[c].denoise(x[i:i + 1], s1[i:i + 1])[0] for i, c in enumerate(labels)])
    loop_s = torch.stack([models[c].score(x[i:i + 1], s0[i:i + 1])[0] for i, c in enumerate(labels)])
    assert rel_err(family.teleport(x, s0, s1, labels), loop_t) < 1e-12
    assert rel_err(family.denoise(x, s1, labels), loop_d) < 1e-12
    assert rel_err(family.score(x, s0, labels), loop_s) < 1e-12
    chunked = GaussianFamily.from_models(models, max_gather_elements=40)  # 1 sample per chunk
    assert rel_err(chunked.teleport(x, s0, s1, labels), loop_t) < 1e-12
    # sampling a mixed-class batch: teleport and analytic denoiser both per sample
    bound = family.for_labels(labels)
    noise = torch.randn(7, 6, dtype=torch.float64)
    out = sample(bound, noise, karras_sigmas(10, dtype=torch.float64), method="heun", gaussian=bound, skip=10)
    exact = torch.stack([reference_teleport(models[c], noise[i:i + 1] * 80, 80.0, 0.0)[0] for i, c in enumerate(labels)])
    assert rel_err(out.x, exact) < 1e-12
    with pytest.raises(ValueError, match="labels"):
        family.teleport(x, s0, s1, torch.tensor([0, 1, 3, 0, 0, 0, 0]))


def test_gaussian_family_fit():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    data = torch.randn(300, 5, generator=g, dtype=torch.float64) * (labels[:, None] + 1) + labels[:, None] * 4
    family = GaussianFamily.fit(data, labels)
    for c in range(3):
        ref = gk.GaussianModel.fit(data[labels == c])
        assert rel_err(family.means[c], ref.mean) < 1e-6
        assert rel_err(family[c].eigvals, ref.eigvals) < 1e-6


# ---------------------------------------------------------------------------------------------
# Adapters: a VP network that predicts exactly what the Gaussian implies must give the Gaussian denoiser.
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_denoiser_adapter(prediction_type):
    model = gaussian_model()
    abar = linear_alphas_cumprod(1000)

    def network(x_vp, t):
        sigma = timestep_to_sigma(t, abar)
        a = (1 / (1 + sigma * sigma)).reshape(-1, 1)
        x_ve = x_vp / a.sqrt()
        x0 = model.denoise(x_ve, sigma)
        eps = (x_ve - x0) / sigma.reshape(-1, 1)
        out = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
        return type("Output", (), {"sample": out})()  # diffusers-style return value

    den = VPDenoiser(network, abar, prediction_type=prediction_type)
    x = torch.randn(6, 8, dtype=torch.float64) * 3
    sigma = torch.tensor([0.02, 0.3, 1.0, 5.0, 40.0, 150.0], dtype=torch.float64)
    assert rel_err(den(x, sigma), model.denoise(x, sigma)) < 1e-9


def test_vp_denoiser_learned_variance_quantize_and_flow_denoiser():
    abar = linear_alphas_cumprod(1000)
    seen = []

    def network(x_vp, t):
        seen.append(t)
        return torch.cat([torch.zeros_like(x_vp), torch.ones_like(x_vp)], 1)

    x = torch.randn(2, 3, 4, 4)
    sigma = torch.tensor([1.0, 10.0])
    out = VPDenoiser(network, abar, learned_variance=True, quantize=True)(x, sigma)
    assert torch.equal(out, x) and torch.equal(seen[-1], seen[-1].round())
    with pytest.raises(ValueError, match="learned_variance"):
        VPDenoiser(network, abar)(x, sigma)
    model = gaussian_model()

    def velocity(x_flow, t1000):
        t = (t1000 / 1000).reshape(-1, 1)
        x_ve = x_flow / (1 - t)
        sigma = (t / (1 - t)).reshape(-1)
        x0 = model.denoise(x_ve, sigma)
        return (x_ve - x0) / sigma.reshape(-1, 1) - x0  # v = eps - x0

    xv = torch.randn(3, 8, dtype=torch.float64)
    sv = torch.tensor([0.05, 1.0, 30.0], dtype=torch.float64)
    assert rel_err(FlowDenoiser(velocity)(xv, sv), model.denoise(xv, sv)) < 1e-9
