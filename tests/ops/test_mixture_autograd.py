"""Autograd of the mixture ops with respect to x: gradcheck in float64, finite differences in float32,
constants, and memory flat in N (the Triton VJP of the CUDA path: test_mixture_vjp_triton.py)."""

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels.mixture import ops
from gsa_kernels.mixture import reference as R
from helpers import SIGMAS as ALL_SIGMAS
from helpers import gen, random_gmm, rel_err, requires_cuda, run_peak_rss_script

SIGMAS = (0.05, 0.7, 5.0)


def _delta_case(dtype=torch.float64, n=9, d=5, seed=0):
    g = gen(seed)
    pts = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    lw = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    x = (pts[:3] + 0.3 * torch.randn(3, d, generator=g, dtype=torch.float64)).to(dtype)
    return x, pts, lw


def _gmm_params(r, dtype=torch.float64, K=4, d=5, seed=1):
    params = list(random_gmm(K, d, r, seed=seed))
    return [None if t is None else t.to(dtype) for t in params]


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("score", [False, True])
def test_delta_mixture_gradcheck(sigma, score):
    x, pts, lw = _delta_case()
    for weights in (lw, None):
        def f(x):
            res = ops.delta_mixture_forward(x, pts, weights, sigma, score=score)
            return res.out, res.log_prob
        assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("r", [0, 2, 5])
def test_gmm_gradcheck(sigma, r):
    lw, means, bases, eigvals, lam_perp = _gmm_params(r)
    if r == 0:
        bases = eigvals = None
    x = means[[0, 2, 3]] + 0.4 * torch.randn(3, 5, generator=gen(3), dtype=torch.float64)
    for score in (False, True):
        def f(x):
            res = ops.gmm_forward(x, lw, means, bases, eigvals, lam_perp, sigma, score=score)
            return res.out, res.log_prob
        assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))


def test_gmm_gradcheck_without_lam_perp_and_image_shape():
    lw, means, bases, eigvals, _ = _gmm_params(2, d=6)
    x = (means[:2] + 0.3 * torch.randn(2, 6, generator=gen(4), dtype=torch.float64)).reshape(2, 2, 3)
    f = lambda x: ops.gmm_forward(x, lw, means, bases, eigvals, None, torch.tensor([0.3, 2.0], dtype=torch.float64)).out
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))


def test_float32_gradient_matches_finite_differences_of_float64():
    d = 32  # above the direct-loop dimension: the GEMM path
    _, pts, lw = _delta_case(n=200, d=d, seed=5)
    pts = (0.02 * pts).float().double()  # several points within a few sigma of each query at sigma = 0.05
    lw32, pts32 = lw.float(), pts.float()
    v = torch.randn(3, d, generator=gen(6), dtype=torch.float64)
    for sigma in (0.05, 0.3, 20.0):
        x = (pts[:3] + sigma * torch.randn(3, d, generator=gen(7), dtype=torch.float64)).float()
        x32 = x.clone().requires_grad_()
        (ops.delta_mixture_forward(x32, pts32, lw32, sigma).out.double() * v).sum().backward()
        h = 1e-5 * sigma  # central differences of the float64 op along each coordinate
        fd = torch.zeros(3, d, dtype=torch.float64)
        for j in range(d):
            e = torch.zeros(3, d, dtype=torch.float64)
            e[:, j] = h
            dp = ops.delta_mixture_forward(x.double() + e, pts, lw, sigma).out
            dm = ops.delta_mixture_forward(x.double() - e, pts, lw, sigma).out
            fd[:, j] = ((dp - dm) * v).sum(1) / (2 * h)
        assert fd.norm() > 0
        assert rel_err(x32.grad, fd) < 1e-4, sigma


def test_log_prob_gradient_is_the_score():
    lw, means, bases, eigvals, lam_perp = _gmm_params(2, dtype=torch.float32)
    x = (means[:3] + 0.5 * torch.randn(3, 5, generator=gen(7))).requires_grad_()
    model = gk.GMM(lw, means, bases, eigvals, lam_perp)
    model.log_prob(x, 0.4).sum().backward()
    assert rel_err(x.grad, model.score(x.detach(), 0.4)) < 1e-6


def test_parameters_are_constants_and_weights_not_differentiable():
    x, pts, lw = _delta_case()
    with pytest.raises((RuntimeError, ValueError), match="points requires grad"):
        ops.delta_mixture_forward(x.requires_grad_(), pts.requires_grad_(), lw, 0.5)
    lw_, means, bases, eigvals, lam_perp = _gmm_params(2)
    x = means[:2].clone().requires_grad_()
    res = ops.gmm_forward(x, lw_, means, bases, eigvals, lam_perp, 0.5, return_weights=True)
    with pytest.raises(NotImplementedError, match="weights"):
        res.weights.sum().backward()


def test_vjp_ops_name_bad_operands():
    x, pts, lw = _delta_case()
    with pytest.raises(RuntimeError, match="frame"):
        torch.ops.gsa.delta_mixture_vjp(x, pts, lw, torch.tensor(0.5, dtype=torch.float64), x[:2], x, None, 0)
    with pytest.raises(ValueError, match="v must"):
        torch.ops.gsa.delta_mixture_vjp(x.to("meta"), pts.to("meta"), lw.to("meta"),
                                        torch.tensor(0.5, dtype=torch.float64).to("meta"), x.to("meta"),
                                        x[:, :2].to("meta"), None, 0)


_BACKWARD_MEMORY = """
B, d = 32, 64
x = torch.randn(B, d)
out = []
for N in (50_000, 200_000):
    pts = torch.randn(N, d)
    xg = x.clone().requires_grad_()
    res = gsa_kernels.mixture.delta_mixture_forward(xg, pts, None, 0.5)
    loss = res.out.sum() + res.log_prob.sum()
    reset_peak()
    base = kib("VmRSS")
    loss.backward()
    out.append(kib("VmHWM") - base)
    del pts
print(*out)
"""


def test_backward_extra_memory_is_independent_of_n():
    """Peak RSS above the inputs during backward for N and 4N points (see the forward's memory test)."""
    small, large = run_peak_rss_script(_BACKWARD_MEMORY)[-2:]
    naive_kib = 32 * 200_000 * 4 // 1024  # one [B, N] float32 matrix
    assert large < naive_kib / 2 and large < 1.5 * small + 2048, (small, large)


def _check_float32_backward(device, n, d, batch=4):
    """x.grad of the float32 training-set and GMM denoisers (public API) against autograd through the float64
    reference, sigma 0.002 .. 80: points 0.1 sigma apart around an offset of 10, so that the posterior is
    spread over several points even in high d (else J^T v is exponentially small); a GMM with bases."""
    worst = 0.0
    for i, sigma in enumerate(ALL_SIGMAS):
        pts = (10 + 0.1 * sigma * torch.randn(n, d, generator=gen(i), dtype=torch.float64)).float().double()
        x = pts.mean(0) + 0.1 * sigma * torch.randn(batch, d, generator=gen(50 + i), dtype=torch.float64)
        x = x.float().double().to(device)
        pts = pts.to(device)
        v = torch.randn(batch, d, generator=gen(60 + i), dtype=torch.float64).to(device)
        x32 = x.float().requires_grad_()
        gk.delta_mixture_denoise(x32, pts.float(), None, sigma).backward(v.float())
        xr = (x - pts.mean(0)).requires_grad_()  # the reference about the points' mean (J does not change)
        R.delta_mixture_denoise(xr, pts - pts.mean(0), None, sigma).backward(v)
        worst = max(worst, rel_err(x32.grad, xr.grad))
        assert rel_err(x32.grad, xr.grad) < 1e-4, (sigma, rel_err(x32.grad, xr.grad))
    lw, means, bases, eig, lp = [t.to(device) for t in random_gmm(6, d, 8, seed=3)]
    for i, sigma in enumerate(ALL_SIGMAS):
        x = (means[:batch] + (0.5 + sigma) * torch.randn(batch, d, generator=gen(70 + i), dtype=torch.float64)
             .to(device)).float().double()
        v = torch.randn(batch, d, generator=gen(80 + i), dtype=torch.float64).to(device)
        x32 = x.float().requires_grad_()
        gk.gmm_denoise(x32, lw.float(), means.float(), bases.float(), eig.float(), lp.float(), sigma).backward(v.float())
        xr = x.clone().requires_grad_()
        R.gmm_denoise(xr, lw, means, bases, eig, lp, sigma).backward(v)
        worst = max(worst, rel_err(x32.grad, xr.grad))
        assert rel_err(x32.grad, xr.grad) < 1e-4, (sigma, rel_err(x32.grad, xr.grad))
    return worst


def test_float32_backward_matches_float64_reference():
    _check_float32_backward("cpu", 200, 64)


@requires_cuda
def test_cuda_float32_backward_matches_float64_reference():
    """The Triton VJP at image size (d = 3072, N = 2000: the reference holds [B, N, d] in float64)."""
    _check_float32_backward("cuda", 2000, 3072)
