"""Triton kernels of the mixture VJP (J^T v of the denoiser): under TRITON_INTERPRET=1 on CPU tensors.

Reference: autograd through the float64 reference (mixture/reference.py). Shapes are tiny but exercise every
mask: B = 5 rows in 16-row tiles, d = 20 / 24 in 16-wide slices, a ragged last chunk of points, 1-3 splits
(the exact merge), an all -inf first chunk, a rank spanning two mode slices. Each case names its data so
that the posterior is spread at every sigma (otherwise J^T v is exponentially small and a relative error
means nothing).
"""
import pytest
import torch

from gsa_kernels.mixture import autograd as mixture_autograd
from gsa_kernels.mixture import reference as R
from helpers import SIGMAS, gen, queries, random_gmm, rel_err

pytestmark = [pytest.mark.matrix,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run these kernels for real")]

SMALL_DELTA = (16, 16, 16, 4)
SMALL_GMM = (16, 16, 4)
# float32 J^T v against float64 (relative 2-norm): measured at most 3e-6 (delta components, sigma 0.002).
F32_VJP_TOL = 1e-5
# Far queries (||x|| ~ 1e4 against points 1e-6 apart): the float64 references themselves keep only ~1e-5 of the
# logits there; measured float32 errors TBD.
FAR_VJP_TOL = 1e-4


def V():
    from gsa_kernels.mixture import triton_mixture_vjp

    return triton_mixture_vjp


def reference_vjp(denoise, x, v):
    """J^T v of a float64 reference denoiser by autograd."""
    x = x.double().clone().requires_grad_()
    (out,) = torch.autograd.grad(denoise(x), x, v.double())
    return out


def reference_gmm_vjp(params, x, sigma, v):
    """J^T v of the float64 reference GMM denoiser, evaluated on x and means moved by the means' mean: J does
    not change (D(x + c) = D(x) + c when every mean moves by c), and the differences x - mu_i stay exact
    (float32-exact inputs) while the reference's own expansion error no longer grows with ||mu||."""
    lw, means, *rest = params
    c = means.mean(0)
    return reference_vjp(lambda t: R.gmm_denoise(t, lw, means - c, *rest, sigma), x - c, v)


def _sigma_rows(sigma, B):
    return torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(B).contiguous()


def _checked_err(got, want, dtype, tol, sigma):
    """The relative error of a finite result of the expected dtype, asserted below tol."""
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = rel_err(got, want)
    assert err < tol, f"sigma={sigma}: {err:.3g}"
    return err


def spread_points(sigma, n=40, d=20, seed=0, offset=10.0):
    """Points 0.7 sigma apart around a common offset (float32-exact): several share each query's posterior."""
    return (offset + 0.7 * sigma * torch.randn(n, d, generator=gen(seed), dtype=torch.float64)).float().double()


def _delta_vjp(x, pts, lw, sigma, v, dtype, splits=2, frame=None, blocks=SMALL_DELTA):
    s = _sigma_rows(sigma, x.shape[0])
    if frame is None:
        frame = R.delta_mixture_denoise(x, pts, lw, s)
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    return V().delta_mixture_vjp(cast(x), cast(pts), cast(lw), s, cast(frame), cast(v),
                                 splits=splits, blocks=blocks)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, F32_VJP_TOL)])
def test_delta_vjp_matches_float64_reference(dtype, tol):
    """sigma 0.002 .. 80, d = 20, N = 40 over 2 splits of 16-point chunks."""
    worst = 0.0
    for i, sigma in enumerate(SIGMAS):
        pts = spread_points(sigma, seed=i)
        x = queries(pts, 5, sigma, seed=i)
        v = torch.randn(5, 20, generator=gen(10 + i), dtype=torch.float64)
        want = reference_vjp(lambda t: R.delta_mixture_denoise(t, pts, None, sigma), x, v)
        worst = max(worst, _checked_err(_delta_vjp(x, pts, None, sigma, v, dtype), want, dtype, tol, sigma))
    print(f"delta VJP {dtype}: worst rel err {worst:.3g}")


def test_delta_vjp_float64_logic():
    """float64 at 1e-11: log-weights with an all -inf first chunk (a split with no weight), a per-row sigma,
    1 and 3 splits, points at the forward's close-points offset."""
    pts = spread_points(0.4, offset=1.0)
    lw = torch.randn(40, generator=gen(3), dtype=torch.float64)
    lw[:20] = float("-inf")
    sigma = torch.tensor([0.3, 1.0, 2.0, 0.5, 5.0], dtype=torch.float64)
    x = queries(pts[20:], 5, sigma)
    v = torch.randn(5, 20, generator=gen(4), dtype=torch.float64)
    want = reference_vjp(lambda t: R.delta_mixture_denoise(t, pts, lw, sigma), x, v)
    for splits in (1, 3):
        assert rel_err(_delta_vjp(x, pts, lw, sigma, v, torch.float64, splits=splits), want) < 1e-11, splits


def test_delta_vjp_matches_the_cpu_kernel():
    """The same J^T v as the C++ kernel (gsa::delta_mixture_vjp on CPU), float64, any frame."""
    pts = spread_points(0.5)
    x = queries(pts, 5, 0.5)
    v = torch.randn(5, 20, generator=gen(5), dtype=torch.float64)
    frame = pts[:5] + 0.1  # J^T v does not depend on the frame
    want = torch.ops.gsa.delta_mixture_vjp(x, pts, None, _sigma_rows(0.5, 5), frame, v, None, 0)
    assert rel_err(_delta_vjp(x, pts, None, 0.5, v, torch.float64, frame=frame), want) < 1e-11


@pytest.mark.parametrize("r", [0, 2, 5])
def test_gmm_vjp_matches_the_cpu_kernel(r):
    """The same J^T v as the C++ kernel (gsa::gmm_vjp on CPU, chunks of 2 components), float64."""
    params = random_gmm(7, 5, r, seed=1)
    x = queries(params[1], 4, 0.5)
    v = torch.randn(4, 5, generator=gen(9), dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 1.0, 9.0], dtype=torch.float64)
    frame = R.gmm_denoise(x, *params, sigma)
    want = torch.ops.gsa.gmm_vjp(x, *params, sigma, frame, v, None, 2)
    got = V().gmm_vjp(x, *params, sigma, frame, v, splits=3, blocks=SMALL_GMM, max_block_r=16)
    assert rel_err(got, want) < 1e-11


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_delta_vjp_half_points(dtype):
    pts = spread_points(0.1).to(dtype)
    x = queries(pts.double(), 5, 0.1)
    v = torch.randn(5, 20, generator=gen(6), dtype=torch.float64)
    frame = R.delta_mixture_denoise(x, pts.double(), None, 0.1)
    got = V().delta_mixture_vjp(x.float(), pts, None, _sigma_rows(0.1, 5), frame.float(),
                                v.float(), splits=2, blocks=SMALL_DELTA)
    want = reference_vjp(lambda t: R.delta_mixture_denoise(t, pts.double(), None, 0.1), x, v)
    assert got.dtype == torch.float32 and rel_err(got, want) < F32_VJP_TOL


def _gmm_vjp(x, params, sigma, v, dtype, splits=2):
    s = _sigma_rows(sigma, x.shape[0])
    frame = R.gmm_denoise(x, *params, s)
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    return V().gmm_vjp(cast(x), *map(cast, params), s, cast(frame), cast(v), splits=splits, blocks=SMALL_GMM,
                       max_block_r=16)


@pytest.mark.parametrize("r,with_lam_perp", [(0, True), (0, False), (3, True), (24, False)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, F32_VJP_TOL)])
def test_gmm_vjp_matches_float64_reference(r, with_lam_perp, dtype, tol):
    """K = 5 components over 2 splits, d = 24, sigma 0.002 .. 80; r = 24 = d is full rank and spans two 16-wide
    mode slices (a ragged one); r = 0 without lam_perp (delta components) has means sigma apart."""
    params = random_gmm(5, 24, r, seed=r, with_lam_perp=with_lam_perp)
    worst = 0.0
    for i, sigma in enumerate(SIGMAS):
        if r == 0 and not with_lam_perp:  # delta components: J = Cov_w / sigma^2 needs a spread posterior
            params = (params[0], spread_points(sigma, n=5, d=24, seed=i)) + params[2:]
            x = queries(params[1], 5, sigma, seed=i)
        else:
            x = queries(params[1], 5, 0.5 + sigma, seed=i)
        v = torch.randn(5, 24, generator=gen(20 + i), dtype=torch.float64)
        want = reference_gmm_vjp(params, x, sigma, v)
        worst = max(worst, _checked_err(_gmm_vjp(x, params, sigma, v, dtype), want, dtype, tol, sigma))
    print(f"GMM VJP r={r} lam_perp={with_lam_perp} {dtype}: worst rel err {worst:.3g}")


def test_gmm_vjp_shared_posterior():
    """Components close together (the covariance term dominates J) at small sigma, 1 and 3 splits."""
    lw, means, bases, eig, lp = random_gmm(6, 20, 4, seed=7)
    means = (means[:1] + 0.05 * (means - means[:1])).float().double()
    params = (lw, means, bases, eig, lp)
    x = queries(means, 5, 0.05)
    v = torch.randn(5, 20, generator=gen(8), dtype=torch.float64)
    want = reference_gmm_vjp(params, x, 0.05, v)
    for splits in (1, 3):
        assert rel_err(_gmm_vjp(x, params, 0.05, v, torch.float64, splits=splits), want) < 1e-11
    assert rel_err(_gmm_vjp(x, params, 0.05, v, torch.float32), want) < F32_VJP_TOL


# ---------------------------------------------------------------------------------------------
# The hard cases of float32 accuracy by construction (docs/math.md section 3.2): the VJP's posterior weights
# must have the forward's accuracy, or J^T v (a posterior covariance) is wrong wherever the forward's
# weights would be.
def pivot_delta_vjp(x, pts, sigma, v):
    """(J^T v, w) of the training-set denoiser in float64 without any expansion: each row's logits are taken
    relative to its nearest point x_j, l_i - l_j = (x_i - x_j).(2 x - x_i - x_j) / (2 sigma^2), from exact
    differences, and J^T v = sum_i w_i (v.(x_i - D)) (x_i - D) / sigma^2 with x_i - D formed about x_j. (The
    plain float64 reference loses eps ||x||^2 / sigma^2 per logit, ~1e-5 for the far queries below.)"""
    s2 = _sigma_rows(sigma, x.shape[0])[:, None] ** 2
    near = torch.cdist(x, pts).argmin(1)
    rel = pts[None] - pts[near][:, None]                                    # x_i - x_j  [B, N, d]
    w = torch.softmax((rel * ((x[:, None] - pts[None]) + (x - pts[near])[:, None])).sum(-1) / (2 * s2), 1)
    dev = rel - torch.einsum("bn,bnd->bd", w, rel)[:, None]                 # x_i - D
    return torch.einsum("bn,bnd->bd", w * torch.einsum("bd,bnd->bn", v, dev), dev) / s2, w


def _peaked_but_spread(w):
    """Each row's posterior is dominated by one point (uniform weights fail), yet some row's J^T v is not
    negligible (a J of zero fails)."""
    top = w.max(1).values
    assert top.min() > 0.5 and top.min() < 1 - 1e-3, top


def test_pivot_reference_matches_autograd():
    pts = spread_points(0.3)
    x = queries(pts, 5, 0.3)
    v = torch.randn(5, 20, generator=gen(30), dtype=torch.float64)
    want = reference_vjp(lambda t: R.delta_mixture_denoise(t, pts, None, 0.3), x, v)
    assert rel_err(pivot_delta_vjp(x, pts, 0.3, v)[0], want) < 1e-12


def test_delta_vjp_far_query_with_tight_components():
    """Points 1e-6 randn (N = 7, d = 64), queries 1e4 randn, sigma = 0.1: float32 logits that carry ||x||^2
    make the posterior uniform; the forward's construction keeps it."""
    g = gen(20)
    pts = (1e-6 * torch.randn(7, 64, generator=g, dtype=torch.float64)).float().double()
    x = (1e4 * torch.randn(3, 64, generator=g, dtype=torch.float64)).float().double()
    v = torch.randn(3, 64, generator=g, dtype=torch.float64)
    want, w = pivot_delta_vjp(x, pts, 0.1, v)
    _peaked_but_spread(w)
    frame = w @ pts
    err = _checked_err(_delta_vjp(x, pts, None, 0.1, v, torch.float32, frame=frame), want, torch.float32,
                       FAR_VJP_TOL, 0.1)
    print(f"delta VJP far query: rel err {err:.3g}")


def test_gmm_vjp_far_query_with_tight_components():
    """r = 0 GMM with delta components (no lam_perp), means 1e-4 randn (K = 5, d = 32), queries 300 randn, sigma
    = 0.1: ||x - mu_k||^2 must be exact, not only its differences. (With a lam_perp the term a v of J^T v
    dominates and hides the weights.)"""
    g = gen(21)
    means = (1e-4 * torch.randn(5, 32, generator=g, dtype=torch.float64)).float().double()
    x = (300 * torch.randn(4, 32, generator=g, dtype=torch.float64)).float().double()
    v = torch.randn(4, 32, generator=g, dtype=torch.float64)
    params = (torch.zeros(5, dtype=torch.float64), means, None, None, None)
    w, _ = R.gmm_posterior(x, *params, 0.1)
    _peaked_but_spread(w)
    want = reference_gmm_vjp(params, x, 0.1, v)
    err = _checked_err(_gmm_vjp(x, params, 0.1, v, torch.float32), want, torch.float32, FAR_VJP_TOL, 0.1)
    print(f"GMM VJP far query: rel err {err:.3g}")


def test_delta_vjp_clusters_far_from_the_mean():
    """Two clusters 350 from the mean of all points (d = 32, +-62 per coordinate), stored cluster by cluster,
    points 0.7 sigma apart within a cluster, sigma 0.002 .. 80: GEMM operands centred on the mean of all points
    lose eps 350^2 / sigma^2 per logit; the chunk frames keep J^T v within the float32 tolerance."""
    worst = 0.0
    for i, sigma in enumerate(SIGMAS):
        g = gen(40 + i)
        signs = torch.cat([torch.ones(32), -torch.ones(32)]).double()[:, None]
        pts = (62.0 * signs + 0.7 * sigma * torch.randn(64, 32, generator=g, dtype=torch.float64)).float().double()
        x = queries(pts, 5, sigma, seed=i)
        v = torch.randn(5, 32, generator=g, dtype=torch.float64)
        want, _ = pivot_delta_vjp(x, pts, sigma, v)
        worst = max(worst, _checked_err(_delta_vjp(x, pts, None, sigma, v, torch.float32), want, torch.float32,
                                        F32_VJP_TOL, sigma))
    print(f"delta VJP clusters far from the mean: worst rel err {worst:.3g}")


def test_delta_vjp_one_dimensional_at_small_sigma():
    """d = 1, N = 1000 points in random order (chunk frames near the mean of all points), sigma 0.002 and
    0.001: float32 cross terms lose eps ||x - ctr|| ||x_i - ctr|| / sigma^2 (~1e-2 per logit); d <= 16 takes
    them, and the chunk's sums about F, in float64."""
    g = gen(23)
    pts = torch.randn(1000, 1, generator=g, dtype=torch.float64).float().double()
    for sigma in (0.002, 1e-3):
        x = (pts[torch.randint(0, 1000, (16,), generator=g)]
             + sigma * torch.randn(16, 1, generator=g, dtype=torch.float64)).float().double()
        v = torch.randn(16, 1, generator=g, dtype=torch.float64)
        want, _ = pivot_delta_vjp(x, pts, sigma, v)
        err = _checked_err(_delta_vjp(x, pts, None, sigma, v, torch.float32, blocks=(16, 64, 16, 4)), want,
                           torch.float32, F32_VJP_TOL, sigma)
        print(f"delta VJP d = 1, sigma {sigma}: rel err {err:.3g}")


def test_outputs_are_written_everywhere(poison_empty):
    """With new memory filled with NaN, every output element is written (B = 17: a second, ragged row tile)."""
    pts = spread_points(0.3)
    x = queries(pts, 17, 0.3)
    v = torch.randn(17, 20, generator=gen(9), dtype=torch.float64)
    assert torch.isfinite(_delta_vjp(x, pts, None, 0.3, v, torch.float32, splits=3)).all()
    params = random_gmm(4, 20, 3, seed=2)
    assert torch.isfinite(_gmm_vjp(queries(params[1], 17, 0.8), params, 0.3, v, torch.float32, splits=3)).all()


class _CountAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any aten op returns while active (elements), except the interpreter's copies of the
    kernel arguments to and from host memory (set_ on a storage, copy_ into it)."""
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in (torch.ops.aten.set_, torch.ops.aten.copy_):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


def test_workspace_is_flat_in_the_number_of_points():
    """Every buffer the launcher creates (workspace, states, merge and epilogue) is independent of N: the
    same for N = 64 and N = 256 points, and below one [B, N] matrix."""
    largest = []
    for n in (64, 256):
        pts = spread_points(0.5, n=n)
        x = queries(pts, 5, 0.5)
        v = torch.randn(5, 20, generator=gen(11), dtype=torch.float64)
        args = [t.float() for t in (x, pts)] + [_sigma_rows(0.5, 5)]
        args += [t.float() for t in (R.delta_mixture_denoise(x, pts, None, 0.5), v)]
        args.insert(2, None)
        with _CountAllocations() as count:
            V().delta_mixture_vjp(*args, splits=1, blocks=SMALL_DELTA)
        largest.append(count.largest)
    assert largest[0] == largest[1] <= 2 * 5 * 20, largest


# ---------------------------------------------------------------------------------------------
# gradcheck through the functions registered as the CUDA kernels (forward and VJP), run under the interpreter:
# the autograd formula of mixture/autograd.py with the Triton forward and the Triton VJP.
def _triton_op(forward, vjp, sigma, score):
    """x -> (out, log_z) of forward(x, score) with the backward of mixture/autograd.py around vjp(x, frame, v)."""
    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            out, log_z = forward(x, score)[:2]
            ctx.save_for_backward(x, out)
            return out, log_z

        @staticmethod
        def backward(ctx, g_out, g_logz):
            x, out = ctx.saved_tensors
            return mixture_autograd._input_grad(x, sigma, out, score, g_out, g_logz,
                                                lambda frame, v: vjp(x, frame, v), lambda: forward(x, True)[0])

    return Op.apply


@pytest.mark.parametrize("score", [False, True])
def test_gradcheck_through_the_cuda_kernels(score):
    pts = spread_points(0.5, n=9, d=5)
    lw = torch.randn(9, generator=gen(12), dtype=torch.float64)
    x = queries(pts, 3, 0.5)
    sigma = torch.tensor([0.3, 0.5, 1.5], dtype=torch.float64)
    from gsa_kernels.mixture import cuda

    op = _triton_op(lambda x, sc: cuda.delta_mixture_forward_cuda(x, pts, lw, sigma, score=sc),
                    lambda x, frame, v: cuda.delta_mixture_vjp_cuda(x, pts, lw, sigma, frame, v), sigma, score)
    assert torch.autograd.gradcheck(op, (x.clone().requires_grad_(),), fast_mode=True, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("r", [0, 2, 5])
def test_gmm_gradcheck_through_the_cuda_kernels(r):
    lw, means, bases, eig, lp = random_gmm(4, 5, r, seed=1)
    x = queries(means, 3, 0.4)
    sigma = torch.tensor([0.2, 0.7, 3.0], dtype=torch.float64)
    params = (lw, means, bases, eig, None if r == 5 else lp)
    from gsa_kernels.mixture import cuda

    op = _triton_op(lambda x, sc: cuda.gmm_forward_cuda(x, *params, sigma, score=sc),
                    lambda x, frame, v: cuda.gmm_vjp_cuda(x, *params, sigma, frame, v), sigma, False)
    assert torch.autograd.gradcheck(op, (x.clone().requires_grad_(),), fast_mode=True, atol=1e-8, rtol=1e-5)


def test_cuda_wrappers_check_the_vjp_operands():
    from gsa_kernels.mixture import cuda

    pts = spread_points(0.5, n=9, d=5)
    x = queries(pts, 3, 0.5)
    s = _sigma_rows(0.5, 3)
    with pytest.raises(ValueError, match="frame"):
        cuda.delta_mixture_vjp_cuda(x, pts, None, s, x[:2], x)
    with pytest.raises(ValueError, match="v must"):
        cuda.gmm_vjp_cuda(x, torch.zeros(9, dtype=torch.float64), pts, None, None, None, s, x, x[:, :2])
