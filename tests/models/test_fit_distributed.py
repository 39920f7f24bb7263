"""Sharded fits (torch.distributed, gloo, two CPU processes) equal the one-process fit, and GMM.fit's
streaming/progress/convergence API."""
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gsa_kernels


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def make_data(n=600, d=40, seed=0):
    """Three clusters with distinct spectra (no eigenvalue ties, so eigenvectors are well defined)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for j in range(3):
        centre = torch.zeros(d, dtype=torch.float64)
        centre[j] = 25.0
        scales = torch.linspace(4.0, 0.2, d, dtype=torch.float64) * (1 + 0.3 * j)
        parts.append(centre + torch.randn(n // 3, d, generator=g, dtype=torch.float64) * scales)
    return torch.cat(parts)[torch.randperm(n, generator=g)]


def fits(data, sharded):
    """Every fit under test, as a dict of name -> tensor (float64)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=64)
    out = {}
    full = gsa_kernels.GaussianModel.fit(loader, rank=6, method="full", dtype=torch.float64, sharded=sharded)
    low = gsa_kernels.GaussianModel.fit(loader, rank=6, method="lowrank", n_passes=5, tol=None, seed=3,
                                        dtype=torch.float64, sharded=sharded)
    gmm = gsa_kernels.GMM.fit(loader, 3, rank=3, seed=1, method="lowrank", n_passes=4, dtype=torch.float64,
                              sharded=sharded, verbose=False)
    for name, model in (("full", full), ("lowrank", low), ("gmm", gmm)):
        for key, t in model.state_dict().items():
            out[f"{name}.{key}"] = t
    out["gmm.n_iter"] = torch.tensor(gmm.n_iter_)
    out["gmm.inertia"] = torch.tensor(gmm.inertia_, dtype=torch.float64)
    return out


def _worker(rank, world, init_file, data, result_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cut = 250  # unequal shards
        shard = data[:cut] if rank == 0 else data[cut:]
        res = fits(shard, sharded=True)
        if rank == 0:
            torch.save(res, result_path)
    finally:
        dist.destroy_process_group()


def test_two_process_fits_equal_one_process():
    data = make_data()
    one = fits(data, sharded=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), data, path), nprocs=2, join=True)
        two = torch.load(path)
    assert one.keys() == two.keys()
    worst = {k: float((one[k].double() - two[k].double()).abs().max() / one[k].double().abs().max().clamp_min(1e-300))
             for k in one}
    bad = {k: v for k, v in worst.items() if not v <= 1e-10}
    assert not bad, bad


def test_gmm_fit_streams_a_dataloader_like_a_tensor():
    data = make_data(d=12)
    a = gsa_kernels.GMM.fit(data, 3, rank=2, seed=0, verbose=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.zeros(len(data))),
                                         batch_size=50)
    b = gsa_kernels.GMM.fit(loader, 3, rank=2, seed=0, verbose=False, device="cpu")
    for key, t in a.state_dict().items():
        assert rel_err(b.state_dict()[key], t) < 1e-6, key
    assert a.converged_ and 1 <= a.n_iter_ < 50 and a.n_iter_ == b.n_iter_
    # inertia_ is the k-means objective at the final assignment.
    d2 = torch.cdist(data, a.means.double()) ** 2
    assert abs(a.inertia_ - float(d2.min(1).values.sum())) < 1e-4 * a.inertia_


def test_gmm_fit_reports_progress_and_non_convergence(capsys):
    data = make_data(d=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gmm = gsa_kernels.GMM.fit(data, 6, seed=0, n_iter=1, tol=0.0, verbose=True)
    assert not gmm.converged_ and gmm.n_iter_ == 1
    assert any("did not converge" in str(w.message) for w in caught)
    assert "GMM.fit" in capsys.readouterr().err
    gsa_kernels.GMM.fit(data, 3, seed=0, verbose=False)
    assert capsys.readouterr().err == ""


def test_gmm_fit_bad_arguments():
    data = make_data(d=6)
    for kwargs, word in [(dict(n_iter=0), "n_iter"), (dict(tol=-1.0), "tol"), (dict(init_size=2), "init_size"),
                         (dict(init=torch.zeros(2, 6)), "init"), (dict(method="em"), "method")]:
        with pytest.raises(ValueError, match=word):
            gsa_kernels.GMM.fit(data, 3, verbose=False, **kwargs)
    with pytest.raises(TypeError, match="one-shot"):
        gsa_kernels.GMM.fit((b for b in data.split(100)), 3, verbose=False)
