"""GMM and DeltaMixture modules: API, state_dict, GMM.fit (k-means++ / Lloyd / per-cluster eigh), sharding."""
import io
import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gsa_kernels
from gsa_kernels.mixture.fit import cluster_moments
from gsa_kernels.mixture import reference as R
from helpers import close_points, gen, queries, random_gmm, rel_err


def test_modules_match_functional_ops_and_reference():
    params = random_gmm(6, 12, 3, seed=0)
    gmm = gsa_kernels.GMM(*params)
    x = queries(params[1], 4, 1.0).reshape(4, 3, 4)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=torch.float64)
    x2 = x.reshape(4, 12)
    assert gmm.denoise(x, sigma).shape == x.shape
    assert rel_err(gmm.denoise(x, sigma).reshape(4, 12), R.gmm_denoise(x2, *params, sigma)) < 1e-12
    assert rel_err(gmm.score(x, sigma).reshape(4, 12), R.gmm_score(x2, *params, sigma)) < 1e-10
    assert rel_err(gmm.log_prob(x, sigma), R.gmm_log_prob(x2, *params, sigma)) < 1e-12
    w_ref, _ = R.gmm_posterior(x2, *params, sigma)
    assert (gmm.posterior(x, sigma) - w_ref).abs().max() < 1e-13
    res = gmm(x, sigma, return_weights=True)
    assert rel_err(res.out, gmm.denoise(x, sigma)) == 0 and rel_err(res.log_prob, gmm.log_prob(x, sigma)) == 0

    pts = close_points(30, 12)
    lw = torch.randn(30, generator=gen(1), dtype=torch.float64)
    delta = gsa_kernels.DeltaMixture(pts.reshape(30, 3, 4), lw)
    x = queries(pts, 4, 0.1).reshape(4, 3, 4)
    want = R.delta_mixture_denoise(x.reshape(4, 12), pts, lw, 0.1)
    assert rel_err(delta.denoise(x, 0.1).reshape(4, 12), want) < 1e-12
    assert rel_err(delta.log_prob(x, 0.1), R.delta_mixture_log_prob(x.reshape(4, 12), pts, lw, 0.1)) < 1e-12
    with pytest.raises(ValueError, match="return_weights"):
        delta(x, 0.1, return_weights=True)


def test_state_dict_round_trip():
    gmm = gsa_kernels.GMM(*[None if t is None else t.float() for t in random_gmm(4, 10, 2, seed=2)])
    delta = gsa_kernels.DeltaMixture(torch.randn(50, 10).half())
    delta_w = gsa_kernels.DeltaMixture(torch.randn(50, 10), torch.randn(50))
    x = torch.randn(3, 10)
    for model in (gmm, delta, delta_w):
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf)
        assert "center" not in sd  # derived, not stored
        again = type(model).from_state_dict(sd)
        assert torch.equal(again.denoise(x, 0.7), model.denoise(x, 0.7))
        assert torch.equal(again.log_prob(x, 0.7), model.log_prob(x, 0.7))
        fresh = type(model).from_state_dict(sd)
        fresh.load_state_dict(sd)
    assert "log_weights" not in delta.state_dict() and delta.points.dtype == torch.float16
    assert gmm.to(torch.float64).means.dtype == torch.float64


def test_constructors_name_bad_arguments():
    lw, means, bases, eig, lp = random_gmm(3, 5, 2, seed=0)
    cases = [
        (lambda: gsa_kernels.GMM(lw[:0], means[:0]), "means"),
        (lambda: gsa_kernels.GMM(lw[:2], means), "log_weights"),
        (lambda: gsa_kernels.GMM(lw, means, bases, -eig, lp), "eigvals"),
        (lambda: gsa_kernels.GMM(lw, means, bases, None, lp), "eigvals"),
        (lambda: gsa_kernels.GMM(lw, means, bases, eig, -lp), "lam_perp"),
        (lambda: gsa_kernels.GMM(torch.full_like(lw, float("-inf")), means), "log_weights"),
        (lambda: gsa_kernels.GMM(lw, means * float("nan")), "means"),
        (lambda: gsa_kernels.DeltaMixture(torch.randn(0, 5)), "points"),
        (lambda: gsa_kernels.DeltaMixture(torch.tensor([[1.0, float("inf")]])), "points"),
        (lambda: gsa_kernels.DeltaMixture(torch.randn(4, 5), torch.zeros(3)), "log_weights"),
        (lambda: gsa_kernels.DeltaMixture(torch.randn(4, 5)).denoise(torch.randn(2, 5), 0.0), "sigma"),
        (lambda: gsa_kernels.GMM.fit(torch.randn(10, 4), 11, 1), "n_components"),
        (lambda: gsa_kernels.GMM.fit(torch.randn(10, 4), 2, 5), "rank"),
        (lambda: gsa_kernels.GMM.fit(torch.full((10, 4), float("nan")), 2, 1), "data"),
    ]
    for fn, name in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            fn()
        assert name in str(info.value), (name, str(info.value))


# ---------------------------------------------------------------------------------------------
# Fitting.
def _three_clusters(n_per=(300, 200, 100), d=8, seed=0):
    """Well separated clusters with anisotropic (rank-2 + small isotropic) covariance."""
    g = gen(seed)
    parts = []
    for j, n in enumerate(n_per):
        centre = torch.zeros(d, dtype=torch.float64)
        centre[j] = 20.0
        basis = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0]
        z = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0], dtype=torch.float64)
        parts.append(centre + z @ basis.T + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64))
    return torch.cat(parts)


def test_fit_recovers_clusters_and_their_moments():
    data = _three_clusters()
    gmm = gsa_kernels.GMM.fit(data.float(), 3, rank=2, seed=0)
    assert gmm.n_components == 3 and gmm.rank == 2
    order = torch.argsort(gmm.means.double().argmax(1))  # component j sits at +20 e_j
    sizes = torch.exp(gmm.log_weights.double()[order]) * 600
    assert torch.allclose(sizes, torch.tensor([300.0, 200.0, 100.0], dtype=torch.float64), atol=1e-3)
    for j, (lo, hi) in enumerate([(0, 300), (300, 500), (500, 600)]):
        k = int(order[j])
        cluster = data[lo:hi]
        cov = torch.cov(cluster.T, correction=0)  # maximum likelihood, as fit documents
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0), evecs.flip(1)
        assert rel_err(gmm.means[k], cluster.mean(0)) < 1e-6
        assert rel_err(gmm.eigvals[k], evals[:2]) < 1e-5
        assert abs(float(gmm.lam_perp[k]) - float(evals[2:].mean())) < 1e-5 * float(evals[2:].mean()) + 1e-7
        U = gmm.bases[k].double()
        assert rel_err(U @ U.T, evecs[:, :2] @ evecs[:, :2].T) < 1e-4  # same subspace
    # Never a d x d matrix per component: bases are [K, d, r].
    assert tuple(gmm.bases.shape) == (3, 8, 2) and tuple(gmm.eigvals.shape) == (3, 2)


def test_fit_is_seeded():
    data = torch.randn(400, 6, generator=gen(0))
    a = gsa_kernels.GMM.fit(data, 5, rank=1, seed=7)
    b = gsa_kernels.GMM.fit(data, 5, rank=1, seed=7)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def test_cluster_moments_gram_trick_matches_full_covariance():
    """n_j < d takes the n_j x n_j Gram path; it must agree with eigh of the d x d covariance."""
    g = gen(1)
    X = torch.randn(12, 40, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 40, dtype=torch.float64)
    for rank in (3, 11, 15):  # 15 > n_j - 1 = 11 nonzero eigenvalues: completed with zero-variance directions
        log_w, mean, U, evals, lam_perp = cluster_moments(X, rank, 24, g)
        cov = torch.cov(X.T, correction=0)
        ev, vec = torch.linalg.eigh(cov)
        ev, vec = ev.flip(0).clamp_min(0), vec.flip(1)
        assert torch.allclose(evals, ev[:rank], atol=1e-10)
        assert abs(float(lam_perp) - float(ev[rank:].mean())) < 1e-10
        assert torch.allclose(U.T @ U, torch.eye(rank, dtype=torch.float64), atol=1e-10)  # orthonormal
        k = min(rank, 11)
        assert torch.allclose(U[:, :k] @ U[:, :k].T, vec[:, :k] @ vec[:, :k].T, atol=1e-8)
        assert abs(float(log_w) - math.log(0.5)) < 1e-15


def test_fit_handles_singleton_and_duplicate_data():
    # A far outlier becomes a singleton cluster: a delta component (zero covariance), still usable.
    data = torch.cat([torch.randn(50, 4, generator=gen(0)), torch.full((1, 4), 100.0)])
    gmm = gsa_kernels.GMM.fit(data, 2, rank=2, seed=0)
    k = int(gmm.means[:, 0].argmax())
    assert torch.equal(gmm.eigvals[k], torch.zeros(2)) and float(gmm.lam_perp[k]) == 0.0
    x = torch.full((1, 4), 100.001)
    assert torch.isfinite(gmm.denoise(x, 0.01)).all()
    assert rel_err(gmm.denoise(x, 1e-3), torch.full((1, 4), 100.0)) < 1e-6
    # Only 2 distinct points for 3 clusters: one stays empty and is dropped with a warning.
    dup = torch.cat([torch.zeros(10, 3), torch.ones(10, 3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gmm = gsa_kernels.GMM.fit(dup, 3, rank=0, seed=0)
    assert gmm.n_components == 2 and any("empty" in str(w.message) for w in caught)
    assert torch.allclose(torch.exp(gmm.log_weights), torch.full((2,), 0.5))


# ---------------------------------------------------------------------------------------------
# Sharding across ranks (gloo, two CPU processes).
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank, world, port, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for dtype in (torch.float32, torch.float64):
            _check_sharded(rank, dtype, tmp)
    finally:
        dist.destroy_process_group()


def _check_sharded(rank, dtype, tmp):
    from gsa_kernels.mixture.distributed import ShardedMixture
    from gsa_kernels.mixture.storage import StreamedDeltaMixture, write_npy

    pts = close_points(70, 16).to(dtype)
    lw = torch.randn(70, generator=gen(2), dtype=torch.float64).to(dtype)
    cut = 31  # unequal shards
    shard = slice(0, cut) if rank == 0 else slice(cut, 70)
    full = gsa_kernels.DeltaMixture(pts, lw)
    sharded = ShardedMixture(gsa_kernels.DeltaMixture(pts[shard], lw[shard]))
    path = os.path.join(tmp, f"shard{rank}_{dtype}.npy".replace("torch.", ""))
    write_npy(path, [pts[shard]], pts[shard].shape[0], 16, dtype=dtype)
    from_disk = ShardedMixture(StreamedDeltaMixture(path, lw[shard], chunk_rows=8))
    uniform_full = gsa_kernels.DeltaMixture(pts)
    uniform = ShardedMixture(gsa_kernels.DeltaMixture(pts[shard]))
    params = [None if t is None else t.to(dtype) for t in random_gmm(9, 16, 3, seed=1)]
    k_shard = slice(0, 4) if rank == 0 else slice(4, 9)
    gmm_full = gsa_kernels.GMM(*params)
    gmm_shard = ShardedMixture(gsa_kernels.GMM(*[t[k_shard] for t in params]))
    tol = 1e-12 if dtype == torch.float64 else 3e-6  # float32: each side is ~1e-6 from float64 (score at sigma = 0.002)
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=dtype)
    x = queries(pts.double(), 4, sigma.double()).to(dtype)
    xg = queries(params[1].double(), 4, 0.5 + sigma.double()).to(dtype)
    checks = {
        "delta denoise": (sharded.denoise(x, sigma), full.denoise(x, sigma)),
        "delta score": (sharded.score(x, sigma), full.score(x, sigma)),
        "delta log_prob": (sharded.log_prob(x, sigma), full.log_prob(x, sigma)),
        "streamed shards denoise": (from_disk.denoise(x, sigma), full.denoise(x, sigma)),
        "streamed shards log_prob": (from_disk.log_prob(x, sigma), full.log_prob(x, sigma)),
        "uniform log_prob": (uniform.log_prob(x, sigma), uniform_full.log_prob(x, sigma)),
        "gmm denoise": (gmm_shard.denoise(xg, sigma), gmm_full.denoise(xg, sigma)),
        "gmm score": (gmm_shard.score(xg, sigma), gmm_full.score(xg, sigma)),
        "gmm log_prob": (gmm_shard.log_prob(xg, sigma), gmm_full.log_prob(xg, sigma)),
        "gmm posterior": (gmm_shard.posterior(xg, sigma), gmm_full.posterior(xg, sigma)[:, k_shard]),
    }
    bad = {k: rel_err(a, b) for k, (a, b) in checks.items() if not rel_err(a, b) < tol}
    if bad:
        raise AssertionError(f"rank {rank} {dtype}: sharded != single process: {bad}")


def test_sharded_mixture_matches_single_process(tmp_path):
    """Two gloo processes, unequal shards of points (delta) and components (GMM): the exact merge equals one
    process to 1e-6 relative in float32 and 1e-12 in float64."""
    mp.spawn(_sharded_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
