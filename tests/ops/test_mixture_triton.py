"""Fused Triton mixture kernels: under TRITON_INTERPRET=1 on CPU tensors (CI), on a GPU where there is one.

The interpreter is slow, so shapes are tiny but chosen to exercise every mask: B = 5 rows in 16-row tiles,
d = 20 in 16-wide slices, N = 40 points in 16-point chunks (a ragged last chunk), 2-3 splits of the points
(the exact merge), an all -inf first chunk. The interpreter ignores input_precision, so the TF32 modes are
covered by an emulation of the kernel arithmetic here and measured only on a GPU.
"""
import pytest
import torch

import gsa_kernels
from gsa_kernels.mixture import reference as R
from helpers import F32_DENOISE_TOL, SIGMAS, close_points, gen, queries, random_gmm, rel_err, requires_cuda

pytestmark = pytest.mark.matrix

DEV = "cuda" if torch.cuda.is_available() else "cpu"
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="covered by the CUDA tests")
SMALL = dict(blocks=(16, 16, 16, 4))


def T():
    from gsa_kernels.mixture import triton_mixture

    return triton_mixture


def _delta(x, pts, lw, sigma, score=False, splits=2, **kw):
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
    ctr = pts.double().mean(0)
    out, log_z = T().delta_mixture_forward(x.to(DEV), pts.to(DEV), None if lw is None else lw.to(DEV), ctr.to(DEV),
                                           s.to(DEV), score=score, splits=splits, **(kw or SMALL))
    return out.cpu(), log_z.cpu()


@interpreter_only
def test_triton_delta_float32_matches_reference_and_cpu_path():
    """Fused (interpreter) vs chunked C++ vs float64 reference on the close-points data of docs/math.md section 3.1."""
    pts = close_points(40, 20)
    for i, sigma in enumerate(SIGMAS):
        x = queries(pts, 5, sigma, seed=i)
        out, log_z = _delta(x.float(), pts.float(), None, sigma)
        want = R.delta_mixture_denoise(x, pts, None, sigma)
        assert torch.isfinite(out).all()
        assert rel_err(out, want) < F32_DENOISE_TOL, f"sigma={sigma}: {rel_err(out, want):.3g}"
        cpu = gsa_kernels.delta_mixture_forward(x.float(), pts.float(), None, sigma)
        assert rel_err(out, cpu.out) < F32_DENOISE_TOL
        _, ref_log_z = R.delta_mixture_posterior(x, pts, None, sigma)
        assert rel_err(log_z, ref_log_z) < 1e-4
        if sigma in (0.002, 0.1, 80.0):
            sc, _ = _delta(x.float(), pts.float(), None, sigma, score=True)
            assert rel_err(sc, R.delta_mixture_score(x, pts, None, sigma)) < 1e-4


@interpreter_only
def test_triton_delta_float64_exact_logic():
    """float64 makes the kernel logic visible at 1e-12: per-row sigma, log-weights with an all -inf first
    chunk (a split with no weight at all), and 1 or 3 splits."""
    pts = close_points(40, 20, offset=1.0, spread=1.0)
    lw = torch.randn(40, generator=gen(3), dtype=torch.float64)
    lw[:20] = float("-inf")
    sigma = torch.tensor([0.3, 1.0, 2.0, 0.5, 5.0], dtype=torch.float64)
    x = queries(pts[20:], 5, sigma)
    want = R.delta_mixture_denoise(x, pts, lw, sigma)
    _, want_log_z = R.delta_mixture_posterior(x, pts, lw, sigma)
    for splits in (1, 3):
        out, log_z = _delta(x, pts, lw, sigma, splits=splits)
        assert rel_err(out, want) < 1e-12 and rel_err(log_z, want_log_z) < 1e-12, splits
    sc, _ = _delta(x, pts, lw, sigma, score=True, splits=3)
    assert rel_err(sc, R.delta_mixture_score(x, pts, lw, sigma)) < 1e-12


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_delta_half_points(dtype):
    pts = close_points(40, 20).to(dtype)
    x = queries(pts.double(), 5, 0.1)
    out, _ = _delta(x.float(), pts, None, 0.1)
    assert out.dtype == torch.float32
    assert rel_err(out, R.delta_mixture_denoise(x, pts.double(), None, 0.1)) < F32_DENOISE_TOL


def _gmm(x, params, sigma, score=False, splits=2):
    lw, means, bases, eig, lp = params
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
    to = (lambda t: None if t is None else t.to(x.dtype).to(DEV))  # noqa: E731
    out, log_z, w = T().gmm_forward(x.to(DEV), to(lw), to(means), to(bases), to(eig), to(lp),
                                    means.double().mean(0).to(DEV), s.to(DEV), score=score, return_weights=True,
                                    splits=splits, blocks=(16, 16, 4), max_block_r=16)
    return out.cpu(), log_z.cpu(), w.cpu()


@interpreter_only
@pytest.mark.parametrize("r,with_lam_perp", [(0, True), (3, True), (24, False)])
def test_triton_gmm_matches_reference(r, with_lam_perp):
    """K = 5 components over 2 splits, d = 24; r = 24 = d is full rank and spans two 16-wide mode slices (a
    ragged one). float64 checks the logic to 1e-12, float32 the accuracy."""
    params = random_gmm(5, 24, r, seed=r, with_lam_perp=with_lam_perp)
    for sigma in (0.01, 2.0):
        x = queries(params[1], 5, 0.5 + sigma)
        out, log_z, w = _gmm(x, params, sigma)
        w_ref, _ = R.gmm_posterior(x, *params, sigma)
        assert rel_err(out, R.gmm_denoise(x, *params, sigma)) < 1e-12, sigma
        assert rel_err(log_z - torch.logsumexp(params[0], 0), R.gmm_log_prob(x, *params, sigma)) < 1e-12
        assert (w - w_ref).abs().max() < 1e-12
        sc, _, _ = _gmm(x, params, sigma, score=True)
        assert rel_err(sc, R.gmm_score(x, *params, sigma)) < 1e-10
    x = queries(params[1], 5, 0.6)
    out, _, _ = _gmm(x.float(), params, 0.1)
    assert rel_err(out, R.gmm_denoise(x, *params, 0.1)) < F32_DENOISE_TOL
    cpu = gsa_kernels.gmm_forward(x.float(), *[None if t is None else t.float() for t in params], 0.1)
    assert rel_err(out, cpu.out) < F32_DENOISE_TOL


@interpreter_only
def test_registered_cuda_wrappers_run_under_the_interpreter():
    """The Python functions registered for the CUDA dispatch key (centre, reshape, dtype) on CPU tensors."""
    from gsa_kernels.mixture import cuda

    pts = close_points(40, 12)
    x = queries(pts, 3, 0.1).float().reshape(3, 3, 4)
    s = torch.full((3,), 0.1)
    out, log_z = cuda.delta_mixture_forward_cuda(x, pts.float(), None, s)
    assert out.shape == x.shape and out.dtype == torch.float32
    want = R.delta_mixture_denoise(x.double().reshape(3, 12), pts, None, 0.1)
    assert rel_err(out.reshape(3, 12), want) < F32_DENOISE_TOL
    lw, means, bases, eig, lp = [None if t is None else t.float() for t in random_gmm(3, 12, 2)]
    out, log_z, w = cuda.gmm_forward_cuda(x, lw, means, bases, eig, lp, s, return_weights=True)
    want = R.gmm_denoise(x.double().reshape(3, 12), *[t.double() for t in (lw, means, bases, eig, lp)], 0.1)
    assert rel_err(out.reshape(3, 12), want) < F32_DENOISE_TOL and w.shape == (3, 3)


# ---------------------------------------------------------------------------------------------
# Precision modes. The kernel's dots are tl.dot products of centred operands; TF32 rounds each operand to
# 10 mantissa bits, 3xTF32 splits it into hi + lo TF32 parts and keeps three of the four products. This
# emulation (float32 accumulation on rounded operands) predicts the GPU errors; the CUDA test measures them.
def _tf32(t):
    bits = t.float().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF  # round to nearest even, 10 mantissa bits
    return bits.view(torch.float32)


def _mm(a, b, mode):
    if mode == "ieee":
        return a @ b
    if mode == "tf32":
        return _tf32(a) @ _tf32(b)
    a_hi, b_hi = _tf32(a), _tf32(b)
    return a_hi @ b_hi + (a_hi @ _tf32(b - b_hi) + _tf32(a - a_hi) @ b_hi)


def emulated_delta_denoise(x, pts, sigma, mode):
    """The fused kernel's arithmetic (centring, expansion, online softmax in one chunk) in float32."""
    ctr = pts.double().mean(0).float()
    xr, pr = x.float() - ctr, pts.float() - ctr
    dist2 = ((xr * xr).sum(1, keepdim=True) - 2 * _mm(xr, pr.T, mode) + (pr * pr).sum(1)).clamp_min(0)
    p = torch.softmax(-dist2 / (2 * sigma**2), dim=1)
    return _mm(p, pr, mode) + ctr


def test_precision_modes_emulated():
    """On close points, at every sigma: ieee and tf32x3 stay at float32 rounding level, tf32 (10-bit operands)
    within the 1e-4 contract thanks to the centring (about 2e-6 here; see the report)."""
    pts = close_points(256, 64)
    worst = {"ieee": 0.0, "tf32x3": 0.0, "tf32": 0.0}
    for i, sigma in enumerate(SIGMAS):
        x = queries(pts, 16, sigma, seed=i)
        want = R.delta_mixture_denoise(x, pts, None, sigma)
        for mode in worst:
            worst[mode] = max(worst[mode], rel_err(emulated_delta_denoise(x, pts, sigma, mode), want))
    assert worst["ieee"] < F32_DENOISE_TOL and worst["tf32x3"] < F32_DENOISE_TOL and worst["tf32"] < 1e-4, worst
    assert worst["tf32"] > 10 * worst["ieee"], worst  # the emulation does round


# ---------------------------------------------------------------------------------------------
# On a GPU: the registered CUDA kernels through the public API, at realistic d.
@requires_cuda
@pytest.mark.parametrize("precision,tol", [("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 1e-4)])
def test_cuda_delta_mixture_precision_modes(precision, tol):
    pts = close_points(2000, 3072).cuda()  # the reference holds [B, N, d] in float64: keep B small
    with gsa_kernels.config.precision(precision):
        for i, sigma in enumerate(SIGMAS):
            x = queries(pts, 16, sigma, seed=i)
            out = gsa_kernels.delta_mixture_denoise(x.float(), pts.float(), None, sigma)
            err = rel_err(out, R.delta_mixture_denoise(x, pts, None, sigma))
            assert err < tol, f"{precision} sigma={sigma}: {err:.3g}"
            half = gsa_kernels.delta_mixture_denoise(x.float(), pts.half(), None, sigma)
            assert rel_err(half, R.delta_mixture_denoise(x, pts.half().double(), None, sigma)) < tol


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_gmm_matches_reference(dtype):
    params = [None if t is None else t.cuda() for t in random_gmm(12, 3072, 32, seed=0)]
    for sigma in SIGMAS:
        x = queries(params[1], 16, 0.5 + sigma)
        res = gsa_kernels.gmm_forward(x.to(dtype), *[None if t is None else t.to(dtype) for t in params], sigma,
                                      return_weights=True)
        tol = 1e-10 if dtype == torch.float64 else F32_DENOISE_TOL
        assert rel_err(res.out, R.gmm_denoise(x, *params, sigma)) < tol, sigma
        w_ref, _ = R.gmm_posterior(x, *params, sigma)
        assert (res.weights - w_ref).abs().max() < 100 * tol
