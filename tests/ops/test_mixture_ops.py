"""Mixture ops (GMM and delta mixture, docs/math.md section 3) on the CPU path against the float64 reference."""
import math

import pytest
import torch

import gsa_kernels
from gsa_kernels.mixture import reference as R
from helpers import (F32_DENOISE_TOL, SIGMAS, as_dtype, close_points, gen, queries, random_gmm, rel_err,
                     run_peak_rss_script)

pytestmark = pytest.mark.matrix

# ---------------------------------------------------------------------------------------------
# Delta mixture.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_delta_mixture_matches_reference_across_sigma(dtype):
    pts = close_points(300, 24)
    lw = torch.randn(300, generator=gen(5), dtype=torch.float64).float().double()
    tol = 1e-10 if dtype == torch.float64 else F32_DENOISE_TOL
    for i, sigma in enumerate(SIGMAS):
        x = queries(pts, 9, sigma, seed=i)
        for log_weights in (None, lw):
            lw_d = None if log_weights is None else log_weights.to(dtype)
            res = gsa_kernels.delta_mixture_forward(x.to(dtype), pts.to(dtype), lw_d, sigma)
            sc = gsa_kernels.delta_mixture_score(x.to(dtype), pts.to(dtype), lw_d, sigma)
            assert res.out.dtype == dtype and torch.isfinite(res.out).all() and torch.isfinite(sc).all()
            err = rel_err(res.out, R.delta_mixture_denoise(x, pts, log_weights, sigma))
            assert err < tol, f"{dtype} sigma={sigma}: denoiser rel err {err:.3g}"
            err = rel_err(sc, R.delta_mixture_score(x, pts, log_weights, sigma))
            assert err < 10 * tol, f"{dtype} sigma={sigma}: score rel err {err:.3g}"
            err = rel_err(res.log_prob, R.delta_mixture_log_prob(x, pts, log_weights, sigma))
            assert err < 10 * tol, f"{dtype} sigma={sigma}: log_prob rel err {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_delta_mixture_half_points(dtype):
    """Half-precision storage of the points, float32 accumulation: exact to float32 level for the stored values."""
    pts = close_points(200, 16).to(dtype)
    for i, sigma in enumerate(SIGMAS):
        x = queries(pts.double(), 7, sigma, seed=i)
        out = gsa_kernels.delta_mixture_denoise(x.float(), pts, None, sigma)
        assert out.dtype == torch.float32
        err = rel_err(out, R.delta_mixture_denoise(x, pts.double(), None, sigma))
        assert err < F32_DENOISE_TOL, f"{dtype} sigma={sigma}: {err:.3g}"


def test_centring_is_what_makes_float32_accurate():
    """The distance expansion without centring exceeds the 1e-4 contract on close points far from the origin
    (so the accuracy test above can fail); the kernel stays at float32 rounding level on the same data."""
    pts = close_points(300, 64, offset=100.0)
    worst_naive, worst_ours = 0.0, 0.0
    for i, sigma in enumerate((0.1, 0.3)):
        x = queries(pts, 16, sigma, seed=i).float()
        p32 = pts.float()
        dist = (x * x).sum(1, keepdim=True) - 2 * x @ p32.T + (p32 * p32).sum(1)
        naive = torch.softmax(-dist / (2 * sigma**2), dim=1) @ p32
        ref = R.delta_mixture_denoise(x.double(), pts, None, sigma)
        worst_naive = max(worst_naive, rel_err(naive, ref))
        worst_ours = max(worst_ours, rel_err(gsa_kernels.delta_mixture_denoise(x, p32, None, sigma), ref))
    assert worst_naive > 1e-4 and worst_ours < F32_DENOISE_TOL, (worst_naive, worst_ours)


def test_per_sample_sigma_and_shapes():
    pts = close_points(50, 12).reshape(50, 3, 4)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    x = queries(pts.reshape(50, 12), len(SIGMAS), sigma).reshape(-1, 3, 4)
    out = gsa_kernels.delta_mixture_denoise(x, pts.reshape(50, 12), None, sigma)
    assert out.shape == x.shape
    assert rel_err(out, R.delta_mixture_denoise(x, pts.reshape(50, 12), None, sigma)) < 1e-10
    for b, s in enumerate(SIGMAS):
        one = gsa_kernels.delta_mixture_denoise(x[b:b + 1], pts.reshape(50, 12), None, s)
        assert rel_err(out[b:b + 1], one) < 1e-13


# ---------------------------------------------------------------------------------------------
# GMM.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("r,with_lam_perp", [(0, True), (3, True), (3, False), (16, False)])
def test_gmm_matches_reference(dtype, r, with_lam_perp):
    d, K = 16, 7
    params = random_gmm(K, d, r, seed=r, with_lam_perp=with_lam_perp)
    means = params[1]
    tol = 1e-10 if dtype == torch.float64 else F32_DENOISE_TOL
    for i, sigma in enumerate(SIGMAS):
        x = queries(means, 6, 0.5 + sigma, seed=i)
        p = as_dtype(params, dtype)
        res = gsa_kernels.gmm_forward(x.to(dtype), *p, sigma, return_weights=True)
        w_ref, _ = R.gmm_posterior(x, *params, sigma)
        err = rel_err(res.out, R.gmm_denoise(x, *params, sigma))
        assert err < tol, f"r={r} {dtype} sigma={sigma}: denoiser {err:.3g}"
        assert rel_err(res.log_prob, R.gmm_log_prob(x, *params, sigma)) < tol
        assert (res.weights - w_ref).abs().max() < 10 * tol
        sc = gsa_kernels.gmm_score(x.to(dtype), *p, sigma)
        err = rel_err(sc, R.gmm_score(x, *params, sigma))
        assert err < 10 * tol, f"r={r} {dtype} sigma={sigma}: score {err:.3g}"


def test_chunks_and_threads_agree():
    """Every chunk size (1 component, a ragged last chunk, one chunk) and thread count gives the same answer."""
    lw, means, bases, eig, lp = random_gmm(23, 10, 2, seed=3)
    x = queries(means, 5, 0.7)
    s = torch.full((5,), 0.3, dtype=torch.float64)
    want = R.gmm_denoise(x, lw, means, bases, eig, lp, 0.3)
    threads = torch.get_num_threads()
    try:
        for n_threads in sorted({1, max(threads, 2)}):
            torch.set_num_threads(n_threads)
            for chunk in (1, 5, 23, 0):
                out, log_z, w = torch.ops.gsa.gmm_forward(x, lw, means, bases, eig, lp, s, None, False, True, chunk)
                assert rel_err(out, want) < 1e-12, (n_threads, chunk)
                assert torch.allclose(w.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-14)
    finally:
        torch.set_num_threads(threads)


def test_one_component_gmm_equals_gaussian_ops():
    d, r = 20, 5
    lw, means, bases, eig, lp = random_gmm(1, d, r, seed=11)
    x = queries(means, 4, 1.0)
    model = gsa_kernels.GaussianModel(means[0], bases[0], eig[0], lp[0])
    gmm = gsa_kernels.GMM(lw, means, bases, eig, lp)
    for sigma in SIGMAS:
        assert rel_err(gmm.denoise(x, sigma), model.denoise(x, sigma)) < 1e-12
        assert rel_err(gmm.score(x, sigma), model.score(x, sigma)) < 1e-10
        assert rel_err(gmm.log_prob(x, sigma), model.log_prob(x, sigma)) < 1e-12


def test_delta_mixture_equals_gmm_with_rank_0_and_lam_perp_0():
    pts = close_points(40, 8, offset=0.0, spread=1.0)
    lw = torch.randn(40, generator=gen(2), dtype=torch.float64)
    delta = gsa_kernels.DeltaMixture(pts, lw)
    gmm = gsa_kernels.GMM(lw, pts, None, None, torch.zeros(40, dtype=torch.float64))
    for sigma in SIGMAS:
        x = queries(pts, 5, sigma)
        assert rel_err(delta.denoise(x, sigma), gmm.denoise(x, sigma)) < 1e-12
        assert rel_err(delta.score(x, sigma), gmm.score(x, sigma)) < 1e-10
        assert rel_err(delta.log_prob(x, sigma), gmm.log_prob(x, sigma)) < 1e-12


@pytest.mark.parametrize("kind", ["gmm", "delta"])
def test_score_is_gradient_of_log_prob(kind):
    """autograd of the float64 reference log p_sigma equals its score and the op's score."""
    if kind == "gmm":
        params = random_gmm(4, 9, 3, seed=4)
        log_prob, score_ref = (lambda x, s: R.gmm_log_prob(x, *params, s)), (lambda x, s: R.gmm_score(x, *params, s))
        op_score = lambda x, s: gsa_kernels.gmm_score(x, *params, s)  # noqa: E731
        centres = params[1]
    else:
        centres = close_points(30, 9, offset=1.0, spread=1.0)
        log_prob = lambda x, s: R.delta_mixture_log_prob(x, centres, None, s)  # noqa: E731
        score_ref = lambda x, s: R.delta_mixture_score(x, centres, None, s)  # noqa: E731
        op_score = lambda x, s: gsa_kernels.delta_mixture_score(x, centres, None, s)  # noqa: E731
    for sigma in (0.05, 0.5, 3.0, 40.0):
        x = queries(centres, 4, sigma).requires_grad_(True)
        (grad,) = torch.autograd.grad(log_prob(x, sigma).sum(), x)
        assert rel_err(score_ref(x.detach(), sigma), grad) < 1e-10
        assert rel_err(op_score(x.detach(), sigma), grad) < 1e-9


# ---------------------------------------------------------------------------------------------
# Limits and robustness.
def test_one_hot_and_uniform_softmax_are_exact():
    pts = close_points(30, 8, offset=0.0, spread=1.0).float()
    x = pts[:6] + 1e-3 * torch.randn(6, 8, generator=gen(0))
    # Tiny sigma: the nearest point exactly (weights one-hot to the last bit).
    out = gsa_kernels.delta_mixture_denoise(x, pts, None, 1e-4)
    assert rel_err(out, pts[:6]) < 3e-7
    gmm = gsa_kernels.GMM(torch.zeros(30), pts)
    w = gmm.posterior(x, 1e-4)
    assert torch.equal(w, torch.eye(30)[:6])
    # Huge sigma: the plain average (uniform weights), and the log density of N(0, sigma^2 I) up to O(1/sigma^2).
    out = gsa_kernels.delta_mixture_denoise(x, pts, None, 1e6)
    assert rel_err(out, pts.double().mean(0).expand(6, 8)) < 1e-6
    w = gmm.posterior(x, 1e6)
    assert (w - 1 / 30).abs().max() < 1e-7
    lp = gsa_kernels.delta_mixture_log_prob(x, pts, None, 1e6)
    want = torch.full((6,), -4 * math.log(2 * math.pi * 1e12), dtype=torch.float64)
    assert torch.allclose(lp.double(), want, rtol=1e-6)


def test_no_nan_or_inf_from_finite_input():
    pts = torch.randn(20, 6, generator=gen(0))
    lw = torch.randn(20, generator=gen(1))
    lw[::3] = float("-inf")  # zero-weight points are allowed
    far = 1e4 * torch.randn(3, 6, generator=gen(2))
    lw_g, means, bases, eig, lp = as_dtype(random_gmm(5, 6, 2, seed=0), torch.float32)
    for sigma in (1e-30, 1e-20, 1e-6, 1e-3, 1.0, 1e3, 1e6, 1e20, 1e30):
        for x in (far, pts[:3] + 1e-3):
            res = gsa_kernels.delta_mixture_forward(x, pts, lw, sigma)
            assert torch.isfinite(res.out).all(), sigma
            g = gsa_kernels.gmm_forward(x, lw_g, means, bases, eig, lp, sigma, return_weights=True)
            assert torch.isfinite(g.out).all() and torch.isfinite(g.weights).all(), sigma
            assert torch.allclose(g.weights.sum(1), torch.ones(3), atol=1e-6)
            if 1e-6 <= sigma <= 1e6:  # where the true values are representable in float32
                assert torch.isfinite(res.log_prob).all() and torch.isfinite(g.log_prob).all(), sigma
                assert torch.isfinite(gsa_kernels.delta_mixture_score(x, pts, lw, sigma)).all(), sigma
                assert torch.isfinite(gsa_kernels.gmm_score(x, lw_g, means, bases, eig, lp, sigma)).all(), sigma


# ---------------------------------------------------------------------------------------------
# Memory: the chunked path's extra memory does not grow with the number of points.
_FORWARD_MEMORY = """
B, d = 64, 16
x, s = torch.randn(B, d), torch.full((B,), 0.5)
torch.ops.gsa.delta_mixture_forward(x[:1], torch.randn(3, d), None, s[:1], None, False, 0)  # thread pool
out = []
for N in (50_000, 200_000):
    pts = torch.randn(N, d)
    ctr = pts.mean(0)
    reset_peak()
    base = kib("VmRSS")
    torch.ops.gsa.delta_mixture_forward(x, pts, None, s, ctr, False, 0)
    out.append(kib("VmHWM") - base)
    del pts
print(*out)
"""


def test_chunked_path_extra_memory_is_independent_of_n():
    """Peak RSS above the inputs during one call, for N and 4N points (helpers.run_peak_rss_script)."""
    small, large = run_peak_rss_script(_FORWARD_MEMORY)[-2:]
    naive_large_kib = 64 * 200_000 * 4 // 1024  # one [B, N] float32 matrix: 50 MiB
    # A few MiB of [B, chunk] temporaries per worker, the same for 4x the points, far below one [B, N] matrix.
    assert 512 < small and large < naive_large_kib / 4, (small, large)
    assert large < 1.5 * small + 2048, (small, large)


# ---------------------------------------------------------------------------------------------
# torch.library contract.
def _op_samples():
    lw, means, bases, eig, lp = as_dtype(random_gmm(5, 12, 3, seed=1), torch.float32)
    x = torch.randn(4, 3, 4)
    s = torch.tensor([0.5, 1.0, 2.0, 0.1])
    yield torch.ops.gsa.gmm_forward.default, (x, lw, means, bases, eig, lp, s), {"return_weights": True}
    yield torch.ops.gsa.gmm_forward.default, (x, lw, means, None, None, None, torch.tensor(0.3)), {"score": True}
    pts = torch.randn(30, 12)
    yield torch.ops.gsa.delta_mixture_forward.default, (x, pts, None, s), {}
    half_args = (x, pts.half(), torch.randn(30), s)
    yield torch.ops.gsa.delta_mixture_forward.default, half_args, {"score": True, "chunk_size": 7}


@pytest.mark.parametrize("i", range(4))
def test_opcheck(i):
    op, args, kwargs = list(_op_samples())[i]
    torch.library.opcheck(op, args, kwargs)


def test_torch_compile_fullgraph():
    model = gsa_kernels.DeltaMixture(torch.randn(40, 10))

    def step(x, s):
        return x + (s[:, None] ** 2) * model.score(x, s)

    x, s = torch.randn(3, 10) * 2, torch.full((3,), 2.0)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x, s), step(x, s)) < 1e-6


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception that names the argument.
def test_bad_input_python_api():
    lw, means, bases, eig, lp = as_dtype(random_gmm(4, 6, 2, seed=0), torch.float32)
    x, pts = torch.randn(2, 6), torch.randn(9, 6)
    G, D = gsa_kernels.gmm_forward, gsa_kernels.delta_mixture_forward
    cases = [
        (lambda: G(x, lw[:0], means[:0], None, None, None, 1.0), "means"),                     # K = 0
        (lambda: D(x, pts[:0], None, 1.0), "points"),
        (lambda: G(torch.randn(2, 7), lw, means, bases, eig, lp, 1.0), "means"),               # d mismatch
        (lambda: D(torch.randn(2, 5), pts, None, 1.0), "points"),
        (lambda: G(x, lw[:3], means, bases, eig, lp, 1.0), "log_weights"),
        (lambda: G(x, lw, means, bases[:, :5], eig, lp, 1.0), "bases"),
        (lambda: G(x, lw, means, bases, eig[:, :1], lp, 1.0), "eigvals"),
        (lambda: G(x, lw, means, bases, None, lp, 1.0), "eigvals"),
        (lambda: G(x, lw, means, bases, eig, lp[:2], 1.0), "lam_perp"),
        (lambda: G(x, lw, means, bases, -eig, lp, 1.0), "eigvals"),                            # negative
        (lambda: G(x, lw, means, bases, eig, -lp, 1.0), "lam_perp"),
        (lambda: G(x, torch.full_like(lw, float("-inf")), means, bases, eig, lp, 1.0), "log_weights"),
        (lambda: D(x, pts, torch.full((9,), float("-inf")), 1.0), "log_weights"),
        (lambda: D(x, pts, torch.full((9,), float("nan")), 1.0), "log_weights"),
        (lambda: G(x, lw, means, bases, eig, lp, 0.0), "sigma"),
        (lambda: D(x, pts, None, -1.0), "sigma"),
        (lambda: D(x, pts, None, float("nan")), "sigma"),
        (lambda: D(x, pts, None, torch.tensor([1.0, float("nan")])), "sigma"),
        (lambda: D(x, pts, None, torch.ones(3)), "sigma"),
        (lambda: D(x.int(), pts, None, 1.0), "x"),
        (lambda: D(torch.randn(6), pts, None, 1.0), "x"),
        (lambda: D(x, pts, None, 1.0, center=torch.zeros(5)), "center"),
    ]
    for fn, name in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            fn()
        assert name in str(info.value), (name, str(info.value))


def test_bad_input_raw_ops_name_the_argument():
    lw, means, bases, eig, lp = as_dtype(random_gmm(4, 6, 2, seed=0), torch.float32)
    x, s = torch.randn(2, 6), torch.ones(2)
    G, D = torch.ops.gsa.gmm_forward, torch.ops.gsa.delta_mixture_forward
    cases = [
        (lambda: G(x, lw[:0], means[:0], None, None, None, s), "means"),
        (lambda: G(x, lw, means, bases, -eig, lp, s), "eigvals"),
        (lambda: G(x, lw, means, bases, eig, lp * float("nan"), s), "lam_perp"),
        (lambda: G(x, torch.full_like(lw, float("-inf")), means, bases, eig, lp, s), "log_weights"),
        (lambda: G(x, lw, means, bases, None, lp, s), "eigvals"),
        (lambda: G(x, lw, means, bases, eig, lp, torch.zeros(2)), "sigma"),
        (lambda: G(x, lw, means, bases, eig, lp, torch.tensor([1.0, float("nan")])), "sigma"),
        (lambda: D(x, torch.randn(3, 5), None, s), "points"),
        (lambda: D(x, torch.randn(3, 6), torch.zeros(4), s), "log_weights"),
        (lambda: D(x, torch.randn(3, 6), None, s, torch.zeros(2)), "center"),
    ]
    for fn, name in cases:
        with pytest.raises(RuntimeError) as info:
            fn()
        assert name in str(info.value), (name, str(info.value))
