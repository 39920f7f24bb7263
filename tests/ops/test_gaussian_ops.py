"""Gaussian ops (project, denoise, score, teleport) against the float64 reference (docs/math.md section 2.1)."""
import math

import numpy as np

import pytest
import torch

import gsa_kernels
from gsa_kernels.gaussian import reference as R
from helpers import SIGMAS, random_gaussian, rel_err, requires_cuda

pytestmark = pytest.mark.matrix

OPS = {
    "denoise": (gsa_kernels.gaussian_denoise, R.gaussian_denoise),
    "score": (gsa_kernels.gaussian_score, R.gaussian_score),
    "teleport": (
        lambda x, *p, s: gsa_kernels.teleport(x, *p, s, 0.3 * s if not isinstance(s, torch.Tensor) else 0.3 * s),
        lambda x, *p, s: R.teleport(x, *p, s, 0.3 * s),
    ),
}
# float64 to 1e-10; float32 to 1e-5; half types to a few units of their rounding (the output is
# stored in the half type, and the reference sees the same rounded input).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def call(op, x, params, sigma):
    fast, _ = OPS[op]
    return fast(x, *params, s=sigma) if op == "teleport" else fast(x, *params, sigma)


def ref(op, x, params, sigma):
    _, slow = OPS[op]
    p64 = [t.double() for t in params]
    s = sigma.double() if isinstance(sigma, torch.Tensor) else sigma
    return slow(x.double(), *p64, s=s) if op == "teleport" else slow(x.double(), *p64, s)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,r", [(96, 96), (96, 12)])
def test_op_matches_reference_across_sigma(op, dtype, d, r, poison_empty):
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = random_gaussian(d, r, dtype=param_dtype, seed=d + r)
    for i, sigma in enumerate(SIGMAS):
        x = (params[0].double() + (1.0 + sigma) * torch.randn(7, d, dtype=torch.float64,
                                                               generator=torch.Generator().manual_seed(i))).to(dtype)
        out = call(op, x, params, sigma)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.isfinite(out).all()
        err = rel_err(out, ref(op, x, params, sigma))
        assert err < TOL[dtype], f"{op} {dtype} sigma={sigma}: rel err {err:.3g}"


@pytest.mark.parametrize("op", list(OPS))
def test_per_sample_sigma(op):
    params = random_gaussian(64, 20)
    B = len(SIGMAS)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    x = torch.randn(B, 64, dtype=torch.float64) * (1 + sigma[:, None])
    out = call(op, x, params, sigma)
    assert rel_err(out, ref(op, x, params, sigma)) < 1e-10
    # Row b equals the op at that row's scalar sigma.
    for b in range(B):
        one = call(op, x[b : b + 1], params, SIGMAS[b])
        assert rel_err(out[b : b + 1], one) < 1e-12


def test_project_matches_reference():
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
        mean, basis, _, _ = random_gaussian(80, 30, dtype=dtype)
        x = torch.randn(6, 80, dtype=dtype) + mean
        c = gsa_kernels.project(x, mean, basis)
        assert c.shape == (6, 30)
        assert rel_err(c, R.project(x.double(), mean.double(), basis.double())) < tol


def test_image_shapes_channels_last_and_noncontiguous():
    C, H, W = 3, 4, 5
    d = C * H * W
    params = random_gaussian(d, 25)
    x = torch.randn(4, C, H, W, dtype=torch.float64)
    want = R.teleport(x, *params, 5.0, 0.5)
    assert want.shape == x.shape
    cl = x.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    assert rel_err(gsa_kernels.teleport(cl, *params, 5.0, 0.5), want) < 1e-12
    xt = torch.randn(C, H, W, 4, dtype=torch.float64).permute(3, 0, 1, 2)  # non-contiguous view
    assert rel_err(gsa_kernels.gaussian_denoise(xt, *params, 0.7), R.gaussian_denoise(xt.contiguous(), *params, 0.7)) < 1e-12
    # A strided (non-contiguous) basis and mean give the same answer.
    mean, basis, eig, lp = params
    basis_f = basis.T.contiguous().T
    assert not basis_f.is_contiguous()
    assert rel_err(gsa_kernels.gaussian_score(x, mean, basis_f, eig, lp, 0.3), R.gaussian_score(x, *params, 0.3)) < 1e-12


# ---------------------------------------------------------------------------------------------
# Teleport is the exact PF-ODE solution.
def rk4_pf_ode(x, params, sigma_from, sigma_to, steps=2000):
    """Integrate dx/dsigma = (x - D(x; sigma)) / sigma in float64 with classical RK4 in t = log sigma
    (dx/dt = x - D). Independent of the teleport formula: it only evaluates the Gaussian denoiser,
    written here densely in numpy (small d keeps 8000 evaluations fast)."""
    mean, basis, eig, lam_perp = (t.double().numpy() for t in params)
    d, r = basis.shape
    perp = np.eye(d) - basis @ basis.T

    def f(x, t):
        s2 = math.exp(2 * t)
        dmat = (basis * (eig / (eig + s2))) @ basis.T + (lam_perp / (lam_perp + s2)) * perp
        return x - (mean + (x - mean) @ dmat)

    t0, t1 = math.log(sigma_from), math.log(sigma_to)
    h = (t1 - t0) / steps
    x, t = x.double().numpy(), t0
    for _ in range(steps):
        k1 = f(x, t)
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += h
    return torch.from_numpy(x)


@pytest.mark.parametrize("d,r,lam_perp", [(32, 32, 0.0), (32, 8, 0.0), (32, 8, 0.05)])
@pytest.mark.parametrize("sigma_from,sigma_to", [(80.0, 0.002), (0.01, 5.0), (2.0, 0.5)])
def test_teleport_solves_the_pf_ode(d, r, lam_perp, sigma_from, sigma_to):
    params = random_gaussian(d, r, lam_perp=lam_perp, seed=3)
    x = params[0] + sigma_from * torch.randn(5, d, dtype=torch.float64)
    fast = gsa_kernels.teleport(x, *params, sigma_from, sigma_to)
    ode = rk4_pf_ode(x, params, sigma_from, sigma_to)
    assert rel_err(fast, ode) <= 1e-6
    # float32 op against the ODE too.
    p32 = [t.float() for t in params]
    assert rel_err(gsa_kernels.teleport(x.float(), *p32, sigma_from, sigma_to), ode) <= 1e-5


def test_teleport_composes_and_identity():
    params = random_gaussian(40, 10, lam_perp=0.1)
    x = params[0] + 80.0 * torch.randn(6, 40, dtype=torch.float64)
    s0, s1, s2 = 80.0, 3.0, 0.002
    two_hops = gsa_kernels.teleport(gsa_kernels.teleport(x, *params, s0, s1), *params, s1, s2)
    assert rel_err(two_hops, gsa_kernels.teleport(x, *params, s0, s2)) < 1e-12
    assert rel_err(gsa_kernels.teleport(x, *params, 7.0, 7.0), x) < 1e-15
    # sigma_to = 0 lands on the Gaussian's clean sample: the orthogonal part collapses only if lam_perp = 0.
    p0 = random_gaussian(40, 10, lam_perp=0.0)
    x0 = gsa_kernels.teleport(x, *p0, s0, 0.0)
    resid = (x0 - p0[0]) - ((x0 - p0[0]) @ p0[1]) @ p0[1].T
    assert float(resid.norm()) < 1e-10 * float(x0.norm())


def test_score_is_gradient_of_log_prob_and_tweedie():
    params = random_gaussian(24, 6, lam_perp=0.2)
    x = (params[0] + torch.randn(3, 24, dtype=torch.float64)).requires_grad_(True)
    for sigma in (0.01, 1.0, 30.0):
        (g,) = torch.autograd.grad(R.gaussian_log_prob(x, *params, sigma).sum(), x)
        s = gsa_kernels.gaussian_score(x.detach(), *params, sigma)
        assert rel_err(s, g) < 1e-10
        # Tweedie: D = x + sigma^2 score.
        d = gsa_kernels.gaussian_denoise(x.detach(), *params, sigma)
        assert rel_err(d, x.detach() + sigma**2 * s) < 1e-9


def test_autograd_wrt_x():
    params = random_gaussian(12, 5, lam_perp=0.3)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    sig = torch.tensor([0.1, 1.0, 4.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: torch.ops.gsa.teleport(x, *params, sig, sig * 0.2), (x,))
    assert torch.autograd.gradcheck(lambda x: torch.ops.gsa.gaussian_denoise(x, *params, sig), (x,))
    assert torch.autograd.gradcheck(lambda x: torch.ops.gsa.gaussian_score(x, *params, sig), (x,))
    assert torch.autograd.gradcheck(lambda x: torch.ops.gsa.project(x, params[0], params[1]), (x,))
    # Second order (the backward is the op itself) and a clear error for parameters that need grad.
    assert torch.autograd.gradgradcheck(lambda x: torch.ops.gsa.teleport(x, *params, sig, sig * 0.2), (x,))
    mean_g = params[0].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="mean requires grad"):
        torch.ops.gsa.gaussian_denoise(x, mean_g, *params[1:], sig)


def test_public_call_records_graph_only_when_asked():
    """The public functions skip the Autograd key when there is nothing to record; with x requiring
    grad they still differentiate, and a parameter requiring grad is still refused."""
    params = random_gaussian(12, 5, lam_perp=0.3)
    x = torch.randn(3, 12, dtype=torch.float64)
    plain = gsa_kernels.gaussian_denoise(x, *params, 0.7)
    assert not plain.requires_grad and plain.grad_fn is None
    xg = x.clone().requires_grad_(True)
    out = gsa_kernels.gaussian_denoise(xg, *params, 0.7)
    assert out.grad_fn is not None and rel_err(out.detach(), plain) == 0
    assert torch.autograd.gradcheck(lambda x: gsa_kernels.gaussian_denoise(x, *params, 0.7), (xg,))
    with torch.no_grad():
        assert gsa_kernels.gaussian_denoise(xg, *params, 0.7).grad_fn is None
    mean_g = params[0].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="mean requires grad"):
        gsa_kernels.gaussian_denoise(x, mean_g, *params[1:], 0.7)


# ---------------------------------------------------------------------------------------------
# torch.library contract: opcheck and torch.compile(fullgraph=True).
def _op_samples():
    mean, basis, eig, lp = random_gaussian(20, 6, dtype=torch.float32)
    x = torch.randn(3, 4, 5, requires_grad=True)
    s = torch.tensor([0.5, 1.0, 2.0])
    yield torch.ops.gsa.project.default, (x, mean, basis)
    yield torch.ops.gsa.gaussian_denoise.default, (x, mean, basis, eig, lp, s)
    yield torch.ops.gsa.gaussian_score.default, (x, mean, basis, eig, lp, torch.tensor(0.3))
    yield torch.ops.gsa.teleport.default, (x, mean, basis, eig, lp, s, s * 0.1)


@pytest.mark.parametrize("i", range(4))
def test_opcheck(i):
    op, args = list(_op_samples())[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    model = gsa_kernels.GaussianModel(*random_gaussian(30, 10, dtype=torch.float32))

    def step(x, s0, s1):
        x = model.teleport(x, s0, s1)
        return x + (s1[:, None] ** 2) * model.score(x, s1)

    x = torch.randn(4, 30) * 10
    s0, s1 = torch.full((4,), 10.0), torch.full((4,), 2.0)
    compiled = torch.compile(step, fullgraph=True)  # inductor: the ops stay opaque custom ops
    assert rel_err(compiled(x, s0, s1), step(x, s0, s1)) < 1e-6


# ---------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU in CI, real GPU where there is one).
def _triton_case(device, dtype, d, r, map_id, sigma):
    from gsa_kernels.gaussian import triton_gaussian as T

    mean, basis, eig, lp = random_gaussian(d, r, seed=map_id)
    B = 5
    x = (mean + (1 + sigma) * torch.randn(B, d, dtype=torch.float64)).to(dtype)
    sa = torch.full((B,), sigma)
    sb = sa * 0.25
    out = torch.full((B, d), float("nan"), dtype=dtype, device=device)  # poisoned
    f32 = [t.float().to(device) for t in (mean, basis, eig, lp.reshape(1))]
    T.gaussian_map(map_id, x.to(device), *f32, sa.to(device), sb.to(device), out)
    fn = [None, R.gaussian_denoise, R.gaussian_score, R.teleport][map_id]
    sig = (sigma, 0.25 * sigma) if map_id == 3 else (sigma,)
    want = fn(x.double(), mean, basis, eig, lp, *sig)
    return rel_err(out.cpu(), want)


@pytest.mark.parametrize("map_id", [1, 2, 3])
@pytest.mark.parametrize("d,r", [(48, 48), (70, 20)])
def test_triton_kernels_interpreted(map_id, d, r):
    if torch.cuda.is_available():
        pytest.skip("covered by the CUDA test")
    for sigma in (0.002, 1.0, 80.0):
        assert _triton_case("cpu", torch.float32, d, r, map_id, sigma) < 1e-5
    assert _triton_case("cpu", torch.float16, d, r, map_id, 0.5) < 3e-3


def test_triton_project_interpreted():
    from gsa_kernels.gaussian import triton_gaussian as T

    mean, basis, _, _ = random_gaussian(50, 17)
    x = torch.randn(9, 50, dtype=torch.float64)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c = T.project(x.float().to(dev), mean.float().to(dev), basis.float().to(dev))
    assert rel_err(c.cpu(), R.project(x, mean, basis)) < 1e-5


@requires_cuda
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("d,r", [(3072, 3072), (3072, 256)])
def test_cuda_ops_match_reference(op, dtype, d, r, poison_empty):
    params = [t.cuda() for t in random_gaussian(d, r, dtype=torch.float64 if dtype == torch.float64 else torch.float32)]
    for sigma in SIGMAS:
        x = (params[0].double() + (1 + sigma) * torch.randn(33, d, device="cuda", dtype=torch.float64)).to(dtype)
        out = call(op, x, params, sigma)
        err = rel_err(out, ref(op, x, params, sigma))
        assert err < TOL[dtype], f"{op} {dtype} sigma={sigma}: {err:.3g}"


@requires_cuda
def test_cuda_precision_modes():
    params = [t.cuda() for t in random_gaussian(1024, 1024, dtype=torch.float32)]
    x = params[0] + 3 * torch.randn(64, 1024, device="cuda")
    want = ref("teleport", x, params, 3.0)
    errs = {}
    for prec in ("ieee", "tf32x3", "tf32"):
        with gsa_kernels.config.precision(prec):
            errs[prec] = rel_err(call("teleport", x, params, 3.0), want)
    assert errs["ieee"] < 1e-5 and errs["tf32x3"] < 1e-5 and errs["tf32"] < 3e-3, errs


@requires_cuda
def test_cuda_graph_capture():
    model = gsa_kernels.GaussianModel(*[t.cuda() for t in random_gaussian(256, 64, dtype=torch.float32)])
    x = torch.randn(8, 256, device="cuda") * 80
    s0, s1 = torch.full((8,), 80.0, device="cuda"), torch.full((8,), 1.0, device="cuda")
    model.teleport(x, s0, s1)  # warm-up (compiles the Triton kernels)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = model.teleport(x, s0, s1)
    x.copy_(torch.randn_like(x) * 80)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, model.teleport(x, s0, s1)) < 1e-6


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception that names the argument.
def test_bad_input_python_api():
    mean, basis, eig, lp = random_gaussian(10, 4, dtype=torch.float32)
    x = torch.randn(2, 10)
    cases = [
        (lambda: gsa_kernels.teleport(torch.randn(2, 11), mean, basis, eig, lp, 1.0, 0.5), "mean"),
        (lambda: gsa_kernels.teleport(x, mean, torch.randn(10, 11), torch.rand(11), lp, 1.0, 0.5), "basis"),
        (lambda: gsa_kernels.teleport(x, mean, basis, torch.rand(5), lp, 1.0, 0.5), "eigvals"),
        (lambda: gsa_kernels.teleport(x, mean, basis, eig, lp, 0.0, 0.5), "sigma_from"),
        (lambda: gsa_kernels.teleport(x, mean, basis, eig, lp, 1.0, -0.5), "sigma_to"),
        (lambda: gsa_kernels.gaussian_score(x, mean, basis, eig, lp, -1.0), "sigma"),
        (lambda: gsa_kernels.gaussian_score(x, mean, basis, eig, lp, float("nan")), "sigma"),
        (lambda: gsa_kernels.gaussian_score(x, mean, basis, eig, lp, torch.tensor([1.0, float("inf")])), "sigma"),
        (lambda: gsa_kernels.gaussian_score(x, mean, basis, eig, lp, torch.ones(3)), "sigma"),
        (lambda: gsa_kernels.gaussian_denoise(x, mean, basis, eig.clone().fill_(float("nan")), lp, 1.0), "eigvals"),
        (lambda: gsa_kernels.gaussian_denoise(x, mean, basis, -eig, lp, 1.0), "eigvals"),
        (lambda: gsa_kernels.gaussian_denoise(x, mean, basis, eig, -1.0, 1.0), "lam_perp"),
        (lambda: gsa_kernels.gaussian_denoise(x.int(), mean, basis, eig, lp, 1.0), "x"),
        (lambda: gsa_kernels.gaussian_denoise(x, mean.to("meta"), basis, eig, lp, 1.0), "mean"),
        (lambda: gsa_kernels.gaussian_denoise(torch.randn(10), mean, basis, eig, lp, 1.0), "x"),
    ]
    for fn, name in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            fn()
        assert name in str(info.value), (name, str(info.value))


def test_bad_input_raw_ops_name_the_argument():
    """Calling torch.ops.gsa.* directly (no Python checks) still gets a named error, not a crash."""
    mean, basis, eig, lp = random_gaussian(10, 4, dtype=torch.float32)
    x, s = torch.randn(2, 10), torch.ones(2)
    cases = [
        (lambda: torch.ops.gsa.teleport(x, mean, basis, eig, lp, torch.zeros(2), s), "sigma_from"),
        (lambda: torch.ops.gsa.teleport(x, mean, basis, eig, lp, s, -s), "sigma_to"),
        (lambda: torch.ops.gsa.gaussian_score(x, mean, basis, -eig, lp, s), "eigvals"),
        (lambda: torch.ops.gsa.gaussian_score(x, mean, basis, eig, lp * float("nan"), s), "lam_perp"),
        (lambda: torch.ops.gsa.gaussian_score(x, mean[:9], basis, eig, lp, s), "mean"),
        (lambda: torch.ops.gsa.gaussian_score(x, mean, torch.randn(10, 11), torch.rand(11), lp, s), "basis"),
        (lambda: torch.ops.gsa.project(x, mean, basis.double().T), "basis"),
        (lambda: torch.ops.gsa.gaussian_denoise(x, mean, basis, eig, lp, torch.ones(3)), "sigma"),
    ]
    for fn, name in cases:
        with pytest.raises(RuntimeError) as info:
            fn()
        assert name in str(info.value), (name, str(info.value))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -1e-30, -1.0])
def test_raw_ops_reject_every_bad_eigenvalue(dtype, layout, bad):
    """The C++ value check of eigvals (a vectorized pass, the full scan only on failure) lets no bad
    value through, wherever it sits, in every dtype and layout; -0.0 and 0 are valid variances."""
    mean, basis, eig, lp = random_gaussian(10, 7, dtype=dtype)
    x, s = torch.randn(2, 10, dtype=dtype), torch.ones(2, dtype=dtype)
    for pos in (0, 3, 6):
        e = eig.clone()
        if layout == "strided":
            e = torch.stack([e, e], 1)[:, 0]
            assert not e.is_contiguous()
        if dtype == torch.float16 and bad == -1e-30:
            continue  # rounds to -0.0 in float16, a valid variance
        e[pos] = bad
        with pytest.raises(RuntimeError, match="eigvals"):
            torch.ops.gsa.gaussian_denoise(x, mean, basis, e, lp, s)
    e = eig.clone()
    e[0], e[1] = -0.0, 0.0
    out = torch.ops.gsa.gaussian_denoise(x, mean, basis, e, lp, s)
    assert torch.isfinite(out).all()
