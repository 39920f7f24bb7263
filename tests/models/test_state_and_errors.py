"""Model state and argument errors: every way in (constructor, from_state_dict, load_state_dict)
checks the same way and copies; the state holds everything the outputs depend on; finite input never
gives NaN; bad arguments raise ValueError / TypeError naming the argument."""
import io
import math

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels._core.dtypes import sigma_floor
from gsa_kernels.gaussian import cuda as gcuda
from gsa_kernels.gaussian import reference as GR
from gsa_kernels.gaussian.map_kind import OP_MAP_KINDS
from gsa_kernels.mixture import reference as MR
from helpers import gaussian_model, gen, random_gmm, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def _models(dtype=torch.float32):
    """One model of each kind, with every optional parameter present."""
    gaussian = gaussian_model(d=8, r=5, lam_perp=0.05, dtype=dtype, seed=0)
    gmm = gk.GMM(*[t.to(dtype) for t in random_gmm(4, 8, 3, seed=1)])
    delta = gk.DeltaMixture(torch.randn(20, 8, generator=gen(2), dtype=dtype),
                            torch.randn(20, generator=gen(3), dtype=dtype))
    return gaussian, gmm, delta


def _outputs(model, x, sigma=0.3):
    if isinstance(model, gk.GaussianModel):
        return model.denoise(x, sigma), model.score(x, sigma), model.log_prob(x, sigma)
    return model.denoise(x, sigma), model.score(x, sigma), model.log_prob(x, sigma)


def _perturbed(state):
    """Another valid state of the same shapes (orthonormal bases stay orthonormal: they are negated)."""
    return {k: (-v if k in ("basis", "bases") else v + 0.5 if k in ("mean", "means", "points", "log_weights")
                else v * 2) for k, v in state.items()}


# -- 1. copies -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["gaussian", "gmm", "delta"])
def test_state_is_copied_in_never_shared(kind):
    model = _models()[kind]
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    copy = type(model).from_state_dict(state)
    copy.load_state_dict(_perturbed(state))          # new values into the copy ...
    for k, v in model.state_dict().items():          # ... leave the original untouched
        assert torch.equal(v, before[k]), k
    other = type(model).from_state_dict(state)
    given = _perturbed(state)
    other.load_state_dict(given, assign=True)
    for k, v in other.state_dict().items():
        assert v.data_ptr() != given[k].data_ptr(), k  # assign=True copies too
        assert torch.equal(v, given[k]), k


# -- 2. one check for every way in ---------------------------------------------------------------
def _bad_states():
    gaussian, gmm, delta = _models()
    nonorthonormal = lambda t: t * 1.5 + 0.1  # noqa: E731
    g = gaussian.state_dict()
    m = gmm.state_dict()
    p = delta.state_dict()
    nan = float("nan")
    return [
        (gaussian, {**g, "mean": g["mean"] * nan}, "mean"),
        (gaussian, {**g, "basis": g["basis"] * nan}, "basis"),
        (gaussian, {**g, "eigvals": -g["eigvals"]}, "eigvals"),
        (gaussian, {**g, "lam_perp": -g["lam_perp"]}, "lam_perp"),
        (gaussian, {**g, "basis": nonorthonormal(g["basis"])}, "basis"),
        (gmm, {**m, "means": m["means"] * nan}, "means"),
        (gmm, {**m, "bases": m["bases"] * nan}, "bases"),
        (gmm, {**m, "bases": nonorthonormal(m["bases"])}, "bases"),
        (gmm, {**m, "eigvals": -m["eigvals"]}, "eigvals"),
        (gmm, {**m, "lam_perp": -m["lam_perp"]}, "lam_perp"),
        (gmm, {**m, "log_weights": m["log_weights"] * nan}, "log_weights"),
        (gmm, {**m, "log_weights": torch.full_like(m["log_weights"], math.inf)}, "log_weights"),
        (gmm, {**m, "log_weights": torch.full_like(m["log_weights"], -math.inf)}, "log_weights"),
        (delta, {**p, "points": p["points"] * nan}, "points"),
        (delta, {**p, "log_weights": p["log_weights"] * nan}, "log_weights"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_every_way_in_checks_the_same(case):
    model, state, name = _bad_states()[case]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=name):
        type(model).from_state_dict(state)
    with pytest.raises(ValueError, match=name):
        model.load_state_dict(state)
    with pytest.raises(ValueError, match=name):
        model.load_state_dict(state, assign=True)
    for k, v in model.state_dict().items():  # a refused load changes nothing
        assert torch.equal(v, before[k]), k


def test_delta_mixture_without_log_weights_is_uniform_on_every_way_in():
    pts = torch.randn(12, 5, generator=gen(0))
    uniform, weighted = gk.DeltaMixture(pts), gk.DeltaMixture(pts, torch.randn(12, generator=gen(1)))
    x = torch.randn(3, 5, generator=gen(2))
    state = {"points": pts}
    built = gk.DeltaMixture.from_state_dict(state)
    weighted.load_state_dict(state)
    assert built.log_weights is None and weighted.log_weights is None
    for model in (built, weighted):
        assert torch.equal(model.denoise(x, 0.4), uniform.denoise(x, 0.4))
        assert torch.equal(model.log_prob(x, 0.4), uniform.log_prob(x, 0.4))
    # ... and a state with log-weights gives a uniform model its weights.
    lw = torch.randn(12, generator=gen(3))
    uniform.load_state_dict({"points": pts, "log_weights": lw})
    assert torch.equal(uniform.log_weights, lw)


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["gaussian", "gmm", "delta"])
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_model_state_loads_back(kind, half):
    model = _models()[kind].to(half)
    x = torch.randn(3, 8, generator=gen(4))
    state = model.state_dict()
    again = type(model).from_state_dict(state)
    fresh = _models()[kind]
    fresh.load_state_dict(state)
    for a, b in zip(_outputs(model, x), _outputs(again, x)):
        assert torch.equal(a, b)
    for a, b in zip(_outputs(model, x), _outputs(fresh.to(half), x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saved_state_loads_back_exactly(dtype):
    x = torch.randn(4, 8, generator=gen(5), dtype=dtype)
    for model in _models(dtype):
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        for again in (type(model).from_state_dict(state), _load_into_other(model, state)):
            for a, b in zip(_outputs(model, x), _outputs(again, x)):
                assert torch.equal(a, b)


def _load_into_other(model, state):
    other = type(model).from_state_dict(_perturbed(state))
    other.load_state_dict(state)
    return other


# -- 3. the expansion centre follows the state ---------------------------------------------------
def test_load_state_dict_recomputes_the_expansion_centre():
    far = (1000 + 0.05 * torch.randn(40, 16, generator=gen(6), dtype=torch.float64)).float()
    near = torch.randn(40, 16, generator=gen(7))
    x = (far[:5].double() + 0.01 * torch.randn(5, 16, generator=gen(8), dtype=torch.float64)).float()
    sigma = 0.02
    want = MR.delta_mixture_denoise(x.double(), far.double(), None, sigma)
    fresh = gk.DeltaMixture(far)
    loaded = gk.DeltaMixture(near)
    loaded.load_state_dict(fresh.state_dict())
    err_fresh = rel_err(fresh.denoise(x, sigma) - 1000, want - 1000)
    err_loaded = rel_err(loaded.denoise(x, sigma) - 1000, want - 1000)
    assert err_loaded == err_fresh and err_fresh < 1e-5

    means = far[:6]
    lw = torch.zeros(6)
    want = MR.gmm_denoise(x.double(), lw.double(), means.double(), None, None, None, sigma)
    fresh, loaded = gk.GMM(lw, means), gk.GMM(lw, near[:6])
    loaded.load_state_dict(fresh.state_dict())
    assert torch.equal(loaded.denoise(x, sigma), fresh.denoise(x, sigma))
    assert rel_err(fresh.denoise(x, sigma) - 1000, want - 1000) < 1e-5


# -- 5. no NaN for finite input ------------------------------------------------------------------
def _tiny_sigma_case(dtype):
    model = gaussian_model(d=8, r=3, lam_perp=0.0, dtype=dtype, seed=9)
    x = model.mean + torch.randn(4, 8, generator=gen(10), dtype=dtype)
    # sigma^2 underflows to 0 in the compute dtype: 2e-23 in float32, 1e-170 in float64.
    return model, x, (1e-23 if dtype == torch.float32 else 1e-170)


def _check_tiny_sigma(run, model, x, sigma):
    params = (model.mean, model.basis, model.eigvals, model.lam_perp)
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
    den = run("gaussian_denoise", x, *params, s)
    # The float64 reference underflows too below 1e-154; at 1e-30 it differs from the limit by ~1e-60.
    want = GR.gaussian_denoise(x.double(), *[t.double() for t in params], s.double().clamp_min(1e-30))
    assert rel_err(den, want) < 1e-5  # the projection onto the Gaussian's affine subspace
    assert not run("gaussian_score", x, *params, s).isnan().any()
    assert not run("teleport", x, *params, s, s * 0.5).isnan().any()



def test_tiny_sigma_gives_no_nan_cpu():
    model, x, sigma = _tiny_sigma_case(torch.float32)
    _check_tiny_sigma(lambda op, *a: getattr(torch.ops.gsa, op)(*a), model, x, sigma)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run these kernels for real")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["triton", "pytorch_maps"])
def test_tiny_sigma_gives_no_nan_cuda_kernels(dtype):
    model, x, sigma = _tiny_sigma_case(dtype)
    _check_tiny_sigma(lambda op, *a: gcuda.map_cuda(OP_MAP_KINDS[op])(*a), model, x, sigma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_floor_is_the_smallest_sigma_with_a_normal_square(dtype):
    floor = torch.tensor(sigma_floor(dtype), dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    assert float(floor * floor) == tiny  # the floor's square is normal ...
    below = torch.nextafter(floor, torch.zeros((), dtype=dtype))
    assert float(below * below) < tiny  # ... and every smaller sigma's is not: normal sigmas are untouched


def _far_queries(centres, scale=3e19):
    """Queries whose squared norm overflows float32 (||x|| = 3e19 > sqrt(3.4e38))."""
    direction = torch.randn(3, centres.shape[1], generator=gen(11), dtype=torch.float64)
    return (scale * direction / direction.norm(dim=1, keepdim=True)).float()



def test_far_queries_give_the_nearest_component():
    pts = torch.randn(10, 6, generator=gen(12))
    x = _far_queries(pts)
    nearest = pts[(x.double() @ pts.double().T - 0.5 * (pts.double() ** 2).sum(1)).argmax(1)]
    # The nearest point to rounding (D is accumulated about the mean of the points, not copied).
    torch.testing.assert_close(gk.DeltaMixture(pts).denoise(x, 1.0), nearest, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gk.GMM(torch.zeros(10), pts).denoise(x, 1.0), nearest, rtol=1e-6, atol=1e-6)



def test_far_queries_with_bases_give_no_nan():
    params = [t.float() for t in random_gmm(4, 6, 2, seed=13)]
    x = _far_queries(params[1])
    res = gk.GMM(*params)(x, 1.0, return_weights=True)
    assert not res.out.isnan().any() and not res.weights.isnan().any()


# -- 6. clear errors -----------------------------------------------------------------------------
def test_errors_name_the_argument():
    gaussian, gmm, delta = _models()
    g = gaussian.state_dict()
    cases = [
        (lambda: gk.GaussianModel(g["mean"], g["basis"], g["eigvals"], torch.tensor([0.1, 0.2])),
         ValueError, "lam_perp"),
        (lambda: gk.GMM(torch.zeros(3), torch.zeros(3, 0)), ValueError, "means"),
        (lambda: gk.DeltaMixture(torch.zeros(3, 0)), ValueError, "points"),
        (lambda: gk.GMM(torch.zeros(3), torch.zeros(3, 0, 2)), ValueError, "means"),
        (lambda: gmm.denoise(torch.randn(2, 7), 0.5), ValueError, "means"),
        (lambda: gmm.posterior(torch.randn(2, 9), 0.5), ValueError, "means"),
        (lambda: delta.denoise(torch.randn(2, 7), 0.5), ValueError, "points"),
        (lambda: delta.log_prob(torch.randn(2, 3, 3), 0.5), ValueError, "points"),
        (lambda: gaussian.denoise(torch.randn(2, 7), 0.5), ValueError, "mean"),
    ]
    for model in (gaussian, gmm, delta):
        cases.append((lambda m=model: m.denoise(torch.randn(2, 8), 1e39), ValueError, "sigma"))
        cases.append((lambda m=model: m.score(torch.randn(2, 8), -1e39), ValueError, "sigma"))
    for i, (call, kind, name) in enumerate(cases):
        with pytest.raises(kind, match=name):
            call()


def test_float64_sigma_beyond_float32_range_is_fine_for_float64_models():
    gmm = _models(torch.float64)[1]
    out = gmm.denoise(torch.randn(2, 8, dtype=torch.float64), 1e39)
    assert torch.isfinite(out).all()


# -- 7. the mixture models are differentiable in x ------------------------------------------------
@pytest.mark.parametrize("kind", [1, 2], ids=["gmm", "delta"])
def test_mixture_models_are_differentiable_in_x(kind):
    model = _models()[kind]
    x = torch.randn(3, 8, generator=gen(14), requires_grad=True)
    (grad,) = torch.autograd.grad(model.log_prob(x, 0.5).sum(), x)
    assert rel_err(grad, model.score(x.detach(), 0.5)) < 1e-5  # grad log p is the score
    v = torch.randn(3, 8, generator=gen(15))
    (jtv,) = torch.autograd.grad((model.denoise(x, 0.5) * v).sum(), x)
    h = 1e-3  # the Jacobian is symmetric: J^T v = J v, a central difference along v
    fd = (model.denoise(x.detach() + h * v, 0.5) - model.denoise(x.detach() - h * v, 0.5)) / (2 * h)
    assert rel_err(jtv, fd) < 1e-3
    assert not model.denoise(x.detach(), 0.5).requires_grad


# -- 8. orthonormal bases ------------------------------------------------------------------------
def test_orthonormalize_option():
    gaussian, gmm, _ = _models()
    g, m = gaussian.state_dict(), gmm.state_dict()
    skewed = g["basis"] @ torch.tensor([[1.0, 0.3, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 2.0, 0, 0],
                                        [0, 0, 0, 1.0, 0], [0, 0, 0, 0, 1.0]])
    with pytest.raises(ValueError, match="basis .*orthonormal"):
        gk.GaussianModel(g["mean"], skewed, g["eigvals"], g["lam_perp"])
    fixed = gk.GaussianModel(g["mean"], skewed, g["eigvals"], g["lam_perp"], orthonormalize=True)
    assert (fixed.basis.T @ fixed.basis - torch.eye(5)).abs().max() < 1e-6
    # Same span, and columns keep their directions (column j of the QR factor of U with positive diagonal R).
    assert ((fixed.basis.T @ skewed).diagonal() > 0).all()
    with pytest.raises(ValueError, match="bases .*orthonormal"):
        gk.GMM(m["log_weights"], m["means"], m["bases"] * 1.01, m["eigvals"], m["lam_perp"])
    ok = gk.GMM(m["log_weights"], m["means"], m["bases"] * 1.01, m["eigvals"], m["lam_perp"], orthonormalize=True)
    assert torch.allclose(ok.bases, m["bases"], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 64, 1024])
def test_rounded_orthonormal_bases_pass_the_check(dtype, d):
    r = min(d, 32)
    basis = torch.linalg.qr(torch.randn(d, r, generator=gen(d), dtype=torch.float64))[0]
    model = gk.GaussianModel(torch.zeros(d, dtype=dtype), basis.to(dtype), torch.ones(r, dtype=dtype))
    assert model.basis.dtype == dtype
    # float32 eigenvectors from eigh at d = 1024 are orthonormal only to ~1e-6.
    if dtype == torch.float32 and d > 1:
        a = torch.randn(d, d, generator=gen(1))
        evecs = torch.linalg.eigh(a @ a.T)[1][:, -r:]
        gk.GaussianModel(torch.zeros(d), evecs, torch.ones(r))
