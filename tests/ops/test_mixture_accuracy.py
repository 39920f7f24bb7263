"""Float32 accuracy of the mixture CPU kernel by construction (docs/math.md section 3.1): far queries keep the
float64 posterior's argmax, low-dimensional data stays exact at small sigma, log p stays within 1e-3 nats."""
import torch

from gsa_kernels.mixture import ops
from gsa_kernels.mixture import reference as R
from helpers import gen, random_gmm, rel_err


def test_far_query_with_tight_components_keeps_the_posterior():
    """Means 1e-6 randn, query 1e4 randn, sigma 0.1: the per-row distance no longer swamps the logits."""
    g = gen(20)
    means = 1e-6 * torch.randn(7, 64, generator=g, dtype=torch.float64)
    lw = torch.zeros(7, dtype=torch.float64)
    x = 1e4 * torch.randn(3, 64, generator=g, dtype=torch.float64)
    want, _ = R.gmm_posterior(x, lw, means, None, None, None, 0.1)
    got = ops.gmm_forward(x.float(), lw.float(), means.float(), sigma=0.1, return_weights=True).weights
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert (got.double() - want).abs().max() < 1e-4


def test_far_query_with_shared_lam_perp_and_bases_keeps_the_argmax():
    lw, means, bases, eigvals, _ = random_gmm(6, 16, 2, seed=21)
    lam_perp = torch.full((6,), 0.3, dtype=torch.float64)
    x = 1e3 * torch.randn(4, 16, generator=gen(22), dtype=torch.float64)
    want, _ = R.gmm_posterior(x, lw, means, bases, eigvals, lam_perp, 0.5)
    f32 = [t.float() for t in (lw, means, bases, eigvals, lam_perp)]
    got = ops.gmm_forward(x.float(), *f32, sigma=0.5, return_weights=True).weights
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_one_dimensional_training_set_at_small_sigma():
    """d = 1, N = 1000: the denoiser within 1e-6 (it was 3e-5 at sigma = 0.002), log p within 1e-3 nats."""
    g = gen(23)
    pts = torch.randn(1000, 1, generator=g, dtype=torch.float64).float().double()
    for sigma in (0.002, 1e-3):
        x = (pts[torch.randint(0, 1000, (64,), generator=g)]
             + sigma * torch.randn(64, 1, generator=g, dtype=torch.float64)).float().double()
        res = ops.delta_mixture_forward(x.float(), pts.float(), None, sigma)
        assert rel_err(res.out, R.delta_mixture_denoise(x, pts, None, sigma)) < 1e-6, sigma
        assert (res.log_prob.double() - R.delta_mixture_log_prob(x, pts, None, sigma)).abs().max() < 1e-3, sigma


def test_log_prob_in_moderate_dimension():
    """d = 32 (the GEMM path): within 1e-3 nats where sigma is not far below the spread of the points; at
    sigma = 0.002 the float32 cross term (x - c).(mu - c) of an unordered chunk still costs ~1 nat."""
    g = gen(24)
    pts = torch.randn(300, 32, generator=g, dtype=torch.float64).float().double()
    for sigma in (0.1, 3.0):
        x = (pts[:16] + sigma * torch.randn(16, 32, generator=g, dtype=torch.float64)).float().double()
        got = ops.delta_mixture_forward(x.float(), pts.float(), None, sigma).log_prob.double()
        want = R.delta_mixture_log_prob(x, pts, None, sigma)
        assert (got - want).abs().max() < 1e-3, sigma
