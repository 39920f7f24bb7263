"""GaussianModel.fit(method="lowrank"): streamed randomized subspace iteration against the full eigh fit."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gsa_kernels
from gsa_kernels.gaussian.fit import fit_gaussian

SIGMAS = [0.002, 0.01, 0.1, 1.0, 10.0, 80.0]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def planted_data(n, d, r, seed=0, top=100.0, decay=0.8, noise=0.05, offset=3.0):
    """n samples of mean offset + r planted directions with variances top * decay^i + isotropic noise:
    a spectral gap at r."""
    g = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q
    std = torch.sqrt(top * decay ** torch.arange(r, dtype=torch.float64))
    mean = offset + torch.randn(d, generator=g, dtype=torch.float64)
    z = torch.randn(n, r, generator=g, dtype=torch.float64) * std
    return mean + z @ W.T + noise ** 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("d", [1024, pytest.param(2048, marks=pytest.mark.slow)])
def test_lowrank_matches_eigh_on_a_gapped_spectrum(d):
    r = 16
    data = planted_data(int(1.5 * d), d, r)
    full = gsa_kernels.GaussianModel.fit(data, rank=r, method="full", dtype=torch.float64)
    low = gsa_kernels.GaussianModel.fit(data, rank=r, method="lowrank", dtype=torch.float64)
    assert full.fit_info_["method"] == "full" and low.fit_info_["method"] == "lowrank"
    eig_err = float(((low.eigvals - full.eigvals).abs() / full.eigvals).max())
    sin_angle = float(torch.linalg.matrix_norm(low.basis - full.basis @ (full.basis.T @ low.basis), ord=2))
    assert eig_err < 1e-6, eig_err
    assert sin_angle < 1e-4, sin_angle
    assert rel_err(low.mean, full.mean) < 1e-14
    assert abs(float(low.lam_perp - full.lam_perp)) < 1e-6 * float(full.lam_perp)
    # The a-posteriori bound |lam - exact| <= residual holds and is small.
    res = low.fit_info_["residuals"]
    assert bool(((low.eigvals - full.eigvals).abs() <= res + 1e-12).all())
    # The op's outputs from both fits agree at every sigma.
    x = data[:8] + torch.randn(8, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for s in SIGMAS:
        e = rel_err(low.denoise(x, s), full.denoise(x, s))
        assert e < 1e-6, (s, e)


def test_lowrank_lam_perp_is_the_exact_mean_of_the_discarded_variance():
    """With rank + oversampling = d the sketch spans everything: eigenvalues and lam_perp are exact."""
    data = planted_data(200, 24, 3, seed=2, decay=0.5)
    full = gsa_kernels.GaussianModel.fit(data, rank=5, method="full", dtype=torch.float64)
    low = gsa_kernels.GaussianModel.fit(data, rank=5, method="lowrank", oversampling=19, n_passes=2,
                                        dtype=torch.float64)
    cov = torch.cov(data.T)
    ev = torch.linalg.eigvalsh(cov).flip(0)
    assert rel_err(low.eigvals, ev[:5]) < 1e-12
    assert abs(float(low.lam_perp) - float(ev[5:].mean())) < 1e-12 * float(ev[5:].mean())
    assert rel_err(full.lam_perp.reshape(1), low.lam_perp.reshape(1)) < 1e-12


def test_lowrank_streams_a_dataloader_and_rejects_one_shot_iterators():
    data = planted_data(500, 64, 4, seed=3).float()
    one = gsa_kernels.GaussianModel.fit(data, rank=4, method="lowrank", dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=70)
    streamed = gsa_kernels.GaussianModel.fit(loader, rank=4, method="lowrank", dtype=torch.float64)
    assert rel_err(streamed.eigvals, one.eigvals) < 1e-10
    assert rel_err(streamed.basis, one.basis) < 1e-8   # signs are canonical
    with pytest.raises(TypeError, match="one-shot"):
        gsa_kernels.GaussianModel.fit((b for b in data.split(100)), rank=4, method="lowrank")
    # The one-pass full fit takes a generator.
    gen_fit = gsa_kernels.GaussianModel.fit((b for b in data.split(100)), rank=4, dtype=torch.float64)
    assert gen_fit.fit_info_["n_samples"] == 500


def test_lowrank_early_stop_and_seed():
    data = planted_data(400, 96, 4, seed=4)
    a = fit_gaussian(data, 4, method="lowrank", n_passes=12, tol=1e-10, seed=5)
    assert 1 < a.n_passes < 12 and bool((a.residuals <= 1e-10 * a.eigvals).all())
    b = fit_gaussian(data, 4, method="lowrank", n_passes=12, tol=1e-10, seed=5)
    assert torch.equal(a.basis, b.basis)


def test_method_choice_and_bad_arguments():
    data = torch.randn(50, 10, dtype=torch.float64)
    assert gsa_kernels.GaussianModel.fit(data, rank=2).fit_info_["method"] == "full"   # small d: auto = full
    for kwargs, word in [(dict(rank=None, method="lowrank"), "rank"), (dict(rank=2, method="svd"), "method"),
                         (dict(rank=2, n_passes=0), "n_passes"), (dict(rank=2, oversampling=-1), "oversampling"),
                         (dict(rank=11), "rank"), (dict(rank=2, tol=0.0), "tol")]:
        with pytest.raises(ValueError, match=word):
            gsa_kernels.GaussianModel.fit(data, **kwargs)
    with pytest.raises(ValueError, match="2 samples"):
        gsa_kernels.GaussianModel.fit(data[:1], rank=2, method="lowrank")
    with pytest.raises(ValueError, match="non-finite"):
        gsa_kernels.GaussianModel.fit(torch.full((4, 3), float("nan")), rank=1, method="lowrank")


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from gsa_kernels.gaussian.fit import fit_gaussian

    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1])

    torch.set_num_threads(1)
    d, n, r = 32768, 256, 8
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, d, generator=g) for _ in range(n // 64)]
    before = hwm_kib()
    res = fit_gaussian(batches, r, method="lowrank", n_passes=2, tol=None)
    print(json.dumps({"peak_delta_mib": (hwm_kib() - before) / 1024, "rank": res.basis.shape[-1]}))
""")


def test_lowrank_memory_is_o_of_d_k():
    """d = 32768: a d x d float64 matrix would take 8 GiB; the low-rank fit's peak stays ~ d k + a batch."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["rank"] == 8
    assert info["peak_delta_mib"] < 200, info   # probes + sketch ~ 10 MiB, a float64 batch 16 MiB, slabs
