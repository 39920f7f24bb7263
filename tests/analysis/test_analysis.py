"""gsa_kernels.analysis against float64 formulas written out here (docs/math.md section 5)."""
import math

import pytest
import torch

from gsa_kernels import DeltaMixture, GaussianModel, analysis, sampling

SIGMAS = [0.002, 0.03, 0.5, 4.0, 80.0]
D = 12


def _data(n=300, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.05, 2.0, d, dtype=torch.float64)
    return 0.3 + torch.randn(n, d, generator=g, dtype=torch.float64) * scales @ torch.linalg.qr(
        torch.randn(d, d, generator=g, dtype=torch.float64))[0]


def _affine_matrix(g: GaussianModel, sigma: float) -> torch.Tensor:
    """W = U diag(f(lam)) U^T + f(lam_perp) (I - U U^T), f(l) = l / (l + sigma^2), in float64."""
    u, lam, lp = g.basis.double(), g.eigvals.double(), float(g.lam_perp)
    f = lam / (lam + sigma**2)
    fp = lp / (lp + sigma**2)
    return (u * f) @ u.T + fp * (torch.eye(u.shape[0], dtype=torch.float64) - u @ u.T)


def _expected_ev(ref_fn, model_fn, data, sigmas, n, seed, quantity):
    """The documented points: x = data[i mod N] + sigma eps, eps drawn per sigma in order from one generator."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    center = data.mean(0)
    for s in sigmas:
        x0 = data[torch.arange(n) % data.shape[0]]
        x = x0 + s * torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        a, b = ref_fn(x, s), model_fn(x, s)
        anchor = x if quantity == "score" else center
        out.append(1 - ((a - b).square().sum(1) / (a - anchor).square().sum(1)).mean())
    return torch.stack(out)


@pytest.mark.parametrize("quantity", ["score", "denoiser"])
def test_explained_variance_matches_float64_formula(quantity):
    data = _data()
    ref = GaussianModel.fit(data, dtype=torch.float64)
    # A different Gaussian: same basis, eigenvalues halved, so the two denoisers differ at every sigma.
    other = GaussianModel(ref.mean + 0.05, ref.basis, ref.eigvals * 0.5)
    n = 500  # more points than data rows: rows are reused with fresh noise; batch_size splits them
    got = analysis.explained_variance(ref, other, data, SIGMAS, quantity=quantity, n_samples=n, batch_size=128,
                                      seed=3)

    def lin(g):
        return lambda x, s: g.mean + (x - g.mean) @ _affine_matrix(g, s).T

    expected = _expected_ev(lin(ref), lin(other), data, SIGMAS, n, 3, quantity)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert got.shape == (len(SIGMAS),) and bool((got < 1).all())


def test_explained_variance_invariants():
    data = _data(n=200)
    g = GaussianModel.fit(data, dtype=torch.float64)
    curves = analysis.explained_variance_curves(
        g, {"self": g, "identity": lambda x, s: x, "training set": DeltaMixture(data)}, data, SIGMAS)
    torch.testing.assert_close(curves["self"], torch.ones(len(SIGMAS), dtype=torch.float64), rtol=0, atol=1e-12)
    # D(x) = x has zero score: it explains none of the reference score.
    torch.testing.assert_close(curves["identity"], torch.zeros(len(SIGMAS), dtype=torch.float64), rtol=0, atol=1e-12)
    # At sigma = 80 every model's score is ~ -(x - mean)/sigma^2: the training set explains the Gaussian.
    assert curves["training set"][-1] > 0.99
    # At sigma = 0.002 the training-set denoiser snaps to the nearest point, far from the Gaussian's.
    assert curves["training set"][0] < 0.5


def test_explained_variance_bad_input():
    data = _data(n=20)
    g = GaussianModel.fit(data, dtype=torch.float64)
    with pytest.raises(ValueError, match="quantity"):
        analysis.explained_variance(g, g, data, SIGMAS, quantity="velocity")
    with pytest.raises(ValueError, match="sigmas"):
        analysis.explained_variance(g, g, data, [0.5, 0.0])
    with pytest.raises(TypeError, match="reference"):
        analysis.explained_variance(42, g, data, SIGMAS)
    with pytest.raises(TypeError, match="data"):
        analysis.explained_variance(g, g, data.numpy(), SIGMAS)


def test_affine_map_of_gaussian_is_its_matrix():
    data = _data()
    g = GaussianModel.fit(data, rank=7, dtype=torch.float64)  # lam_perp > 0 exercises the orthogonal term
    assert float(g.lam_perp) > 0
    for s in SIGMAS:
        w, b = analysis.affine_map_of(g, D, s, dtype=torch.float64)
        w_ref = _affine_matrix(g, s)
        torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(b, g.mean - w_ref @ g.mean, rtol=0, atol=1e-12)


def test_linearity_recovers_an_affine_denoiser():
    data = _data()
    g = GaussianModel.fit(data, dtype=torch.float64)
    other = GaussianModel(g.mean, g.basis, g.eigvals * 3.0)
    lin = analysis.linearity(other, g, data, SIGMAS)
    for i, s in enumerate(SIGMAS):
        wa, wb = _affine_matrix(other, s), _affine_matrix(g, s)
        diff = torch.linalg.norm(wa - wb) / torch.linalg.norm(wa)
        cos = (wa * wb).sum() / (torch.linalg.norm(wa) * torch.linalg.norm(wb))
        assert abs(float(lin.difference[i]) - float(diff)) < 1e-6 * max(1.0, float(diff)), s
        assert abs(float(lin.cosine[i]) - float(cos)) < 1e-6, s
        assert float(lin.r2[i]) > 1 - 1e-9, s
    # Identical maps: zero difference, unit cosine.
    same = analysis.linearity(g, g, data, SIGMAS)
    assert float(same.difference.max()) < 1e-6 and float((1 - same.cosine).abs().max()) < 1e-9


def test_linearity_of_a_nonlinear_denoiser_is_below_one():
    data = _data()
    g = GaussianModel.fit(data, dtype=torch.float64)
    lin = analysis.linearity(lambda x, s: torch.tanh(3 * x), g, data, [0.5])
    assert 0.0 < float(lin.r2[0]) < 0.99
    with pytest.raises(ValueError, match="n_samples"):
        analysis.fit_affine(g, data, 0.5, n_samples=D)


def _straight(t_values, start, end):
    return torch.stack([start + t * (end - start) for t in t_values])


def test_chord_deviation_and_alignment_on_known_paths():
    b, d = 5, 4
    g = torch.Generator().manual_seed(1)
    start = torch.randn(b, d, generator=g, dtype=torch.float64)
    end = torch.randn(b, d, generator=g, dtype=torch.float64)
    sig = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    line = analysis.Trajectory(sig, _straight([0.0, 0.2, 0.7, 1.0], start, end), torch.zeros(3, b, d))
    assert float(analysis.chord_deviation(line).abs().max()) < 1e-12
    torch.testing.assert_close(analysis.step_alignment(line), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    # A detour: the middle point sits off the chord by h along a unit direction orthogonal to it.
    chord = end - start
    perp = torch.randn(b, d, generator=g, dtype=torch.float64)
    perp = perp - (perp * chord).sum(1, keepdim=True) / chord.square().sum(1, keepdim=True) * chord.double()
    perp = perp / perp.norm(dim=1, keepdim=True)
    h = 0.3
    mid = start.double() + 0.5 * chord.double() + h * perp
    x = torch.stack([start.double(), mid, end.double()])
    t = analysis.Trajectory(sig[[0, 2, 3]], x, torch.zeros(2, b, d))
    expected_rel = (h / chord.double().norm(dim=1)).mean()
    torch.testing.assert_close(analysis.chord_deviation(t)[1], expected_rel, rtol=1e-9, atol=0)
    torch.testing.assert_close(analysis.chord_deviation(t, relative=False)[1],
                               torch.tensor(h, dtype=torch.float64), rtol=1e-9, atol=0)
    # First step: cos between (mid - start) and (end - start).
    a, c = mid - start.double(), chord.double()
    cos0 = ((a * c).sum(1) / (a.norm(dim=1) * c.norm(dim=1))).mean()
    torch.testing.assert_close(analysis.step_alignment(t)[0], cos0, rtol=1e-9, atol=0)


def test_gaussian_trajectory_is_the_closed_form():
    data = _data()
    g = GaussianModel.fit(data, dtype=torch.float64)
    noise = torch.randn(6, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig = sampling.karras_sigmas(8, dtype=torch.float64)
    t = analysis.gaussian_trajectory(g, noise, sig)
    u, lam, mu = g.basis, g.eigvals, g.mean
    x0 = 80.0 * noise
    for i, s in enumerate(sig.tolist()):
        ratio = torch.sqrt((lam + s**2) / (lam + 80.0**2))
        expected = mu + ((x0 - mu) @ u * ratio) @ u.T  # full rank: no orthogonal part
        torch.testing.assert_close(t.x[i], expected, rtol=1e-9, atol=1e-9)
        if s > 0:
            torch.testing.assert_close(t.denoised[i], mu + (expected - mu) @ _affine_matrix(g, s).T,
                                       rtol=1e-9, atol=1e-9)
    dist_x, dist_d = analysis.denoising_distances(t)
    # The denoising trajectory is closer to the final sample than the sampling trajectory, at every sigma.
    assert bool((dist_d < dist_x).all())
    dev = analysis.chord_deviation(t)
    # Zero at both ends; inside, a slightly curved path (mode-dependent rates) that is still quasi-linear.
    assert float(dev[0]) < 1e-12 and float(dev[-1]) < 1e-12
    assert 1e-4 < float(dev.max()) < 0.05


def _heun_float64(fn, x, sig):
    """EDM Heun (Karras et al. algorithm 2), written out; returns the points x(sigma_i)."""
    xs = [x]
    for s, s_next in zip(sig[:-1], sig[1:]):
        d = (x - fn(x, s)) / s
        x_e = x + (s_next - s) * d
        if s_next == 0:
            x = x_e
        else:
            x = x + (s_next - s) * 0.5 * (d + (x_e - fn(x_e, s_next)) / s_next)
        xs.append(x)
    return torch.stack(xs)


@pytest.mark.parametrize("skip", [0, 3])
def test_record_trajectory_heun_points(skip):
    data = _data()
    g = GaussianModel.fit(data, dtype=torch.float64)
    gmm_like = DeltaMixture(data[:40])  # a nonlinear denoiser, so predictor and corrector points differ
    noise = torch.randn(5, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sig = sampling.karras_sigmas(10, dtype=torch.float64)
    t = analysis.record_trajectory(gmm_like, noise, sig, method="heun", gaussian=g, skip=skip)
    tail = sig[skip:].tolist()
    start = g.teleport(noise * 80.0, 80.0, tail[0]) if skip else noise * 80.0
    expected = _heun_float64(lambda x, s: gmm_like.denoise(x, s), start, tail)
    torch.testing.assert_close(t.sigmas, torch.tensor(tail, dtype=torch.float64))
    torch.testing.assert_close(t.x, expected, rtol=1e-7, atol=1e-9)
    for i, s in enumerate(tail[:-1]):
        torch.testing.assert_close(t.denoised[i], gmm_like.denoise(t.x[i], s), rtol=1e-9, atol=1e-12)


def test_trajectory_bad_input():
    with pytest.raises(TypeError, match="traj"):
        analysis.chord_deviation(torch.zeros(3, 2, 2))
    g = GaussianModel.fit(_data(n=30), dtype=torch.float64)
    with pytest.raises(ValueError, match="sigmas"):
        analysis.gaussian_trajectory(g, torch.randn(2, D, dtype=torch.float64), torch.tensor([80.0, 1.0]))
    with pytest.raises(ValueError):
        analysis.log_sigma_grid(1)
    grid = analysis.log_sigma_grid(5, 0.002, 80.0)
    assert math.isclose(grid[0], 0.002, rel_tol=1e-12) and math.isclose(grid[-1], 80.0, rel_tol=1e-12)
