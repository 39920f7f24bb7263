"""GaussianModel: fitting (streaming float64 moments + eigh), state_dict, frames."""
import numpy as np
import pytest
import torch

import gsa_kernels
from gsa_kernels import frames
from gsa_kernels.gaussian import reference as R
from helpers import rel_err


def low_rank_data(n=600, d=20, seed=0, offset=100.0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    # A large offset makes a one-pass float32 (X^T X - N mu mu^T) cancel away the small tail.
    return offset + (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ q.T


def test_fit_matches_numpy_cov_and_streams():
    data = low_rank_data()
    model = gsa_kernels.GaussianModel.fit(data.float(), dtype=torch.float64)
    cov = np.cov(data.float().double().numpy(), rowvar=False)
    evals = np.linalg.eigvalsh(cov)[::-1].copy()
    assert np.allclose(model.eigvals.numpy(), evals, rtol=1e-6, atol=1e-12)
    assert rel_err(model.mean, data.float().double().mean(0)) < 1e-12
    # Basis reconstructs the covariance, including the 1e-6 tail.
    recon = (model.basis * model.eigvals) @ model.basis.T
    assert rel_err(recon, torch.from_numpy(cov)) < 1e-8
    assert float(model.eigvals[-1]) == pytest.approx(evals[-1], rel=1e-4)
    # Streaming over uneven batches (a DataLoader yielding (x, label) tuples) gives the same model.
    batches = [(data[i : i + 97].float(), None) for i in range(0, len(data), 97)]
    streamed = gsa_kernels.GaussianModel.fit(batches, dtype=torch.float64)
    assert rel_err(streamed.eigvals, model.eigvals) < 1e-10
    assert rel_err(streamed.mean, model.mean) < 1e-12
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.float()), batch_size=128)
    assert rel_err(gsa_kernels.GaussianModel.fit(loader, dtype=torch.float64).eigvals, model.eigvals) < 1e-10


def test_fit_rank_truncation_sets_lam_perp():
    data = low_rank_data(d=16)
    full = gsa_kernels.GaussianModel.fit(data, dtype=torch.float64)
    low = gsa_kernels.GaussianModel.fit(data, rank=5, dtype=torch.float64)
    assert low.rank == 5 and low.basis.shape == (16, 5)
    assert float(low.lam_perp) == pytest.approx(float(full.eigvals[5:].mean()), rel=1e-10)
    assert torch.allclose(low.basis.T @ low.basis, torch.eye(5, dtype=torch.float64), atol=1e-10)
    with pytest.raises(ValueError, match="rank"):
        gsa_kernels.GaussianModel.fit(data, rank=17)
    with pytest.raises(ValueError, match="data"):
        gsa_kernels.GaussianModel.fit(data[:1])
    with pytest.raises(ValueError, match="data"):
        gsa_kernels.GaussianModel.fit(torch.full((4, 3), float("nan")))


def test_fit_images_and_sample_statistics():
    imgs = torch.randn(400, 2, 3, 3) * torch.linspace(0.1, 2, 18).reshape(1, 2, 3, 3) + 1.0
    model = gsa_kernels.GaussianModel.fit(imgs)
    assert model.dim == 18 and model.mean.dtype == torch.float32
    draws = model.sample(20000, generator=torch.Generator().manual_seed(1))
    assert rel_err(draws.double().var(0), imgs.reshape(400, -1).double().var(0)) < 0.05


def test_state_dict_roundtrip(tmp_path):
    model = gsa_kernels.GaussianModel.fit(low_rank_data(d=12), rank=4)
    path = tmp_path / "g.pt"
    torch.save(model.state_dict(), path)
    loaded = gsa_kernels.GaussianModel.from_state_dict(torch.load(path))
    x = torch.randn(3, 12) * 10 + 100
    assert torch.equal(loaded.teleport(x, 10.0, 1.0), model.teleport(x, 10.0, 1.0))
    # load_state_dict into a model of the same shape.
    other = gsa_kernels.GaussianModel(torch.zeros(12), torch.eye(12)[:, :4].contiguous(), torch.ones(4))
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.denoise(x, 0.5), model.denoise(x, 0.5))


def test_model_methods_match_reference():
    model = gsa_kernels.GaussianModel.fit(low_rank_data(d=10), rank=6, dtype=torch.float64)
    args = (model.mean, model.basis, model.eigvals, model.lam_perp)
    x = torch.randn(4, 10, dtype=torch.float64) * 3 + 100
    assert rel_err(model.denoise(x, 0.3), R.gaussian_denoise(x, *args, 0.3)) < 1e-12
    assert rel_err(model.score(x, 0.3), R.gaussian_score(x, *args, 0.3)) < 1e-12
    assert rel_err(model.project(x), R.project(x, model.mean, model.basis)) < 1e-12
    assert rel_err(model.denoise_along_teleport(x, 5.0, 0.7), R.denoise_along_teleport(x, *args, 5.0, 0.7)) < 1e-12
    lp = model.log_prob(x, 0.3)
    assert lp.shape == (4,) and torch.isfinite(lp).all()


def test_model_rejects_bad_parameters():
    with pytest.raises(ValueError, match="eigvals"):
        gsa_kernels.GaussianModel(torch.zeros(4), torch.eye(4), -torch.ones(4))
    with pytest.raises(ValueError, match="lam_perp"):
        gsa_kernels.GaussianModel(torch.zeros(4), torch.eye(4)[:, :2].contiguous(), torch.ones(2), lam_perp=-1.0)
    with pytest.raises(ValueError, match="basis"):
        gsa_kernels.GaussianModel(torch.zeros(4), torch.eye(5), torch.ones(5))
    with pytest.raises(TypeError, match="mean"):
        gsa_kernels.GaussianModel(torch.zeros(4, dtype=torch.int64), torch.eye(4), torch.ones(4))


@pytest.mark.parametrize("frame", ["vp", "flow"])
def test_teleport_in_other_frames(frame):
    model = gsa_kernels.GaussianModel.fit(low_rank_data(d=8, offset=0.0), dtype=torch.float64)
    x0 = model.sample(5, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(5, 8, dtype=torch.float64)
    if frame == "vp":
        a0, a1 = 0.01, 0.6  # alpha_bar
        x = a0**0.5 * x0 + (1 - a0) ** 0.5 * eps
        s0, s1 = frames.vp_sigma(a0), frames.vp_sigma(a1)
        scale0, scale1 = a0**0.5, a1**0.5
    else:
        a0, a1 = 0.95, 0.3  # t
        x = (1 - a0) * x0 + a0 * eps
        s0, s1 = frames.flow_sigma(a0), frames.flow_sigma(a1)
        scale0, scale1 = 1 - a0, 1 - a1
    got = model.teleport_frame(x, a0, a1, frame=frame)
    want = scale1 * model.teleport(x / scale0, s0, s1)
    assert rel_err(got, want) < 1e-13
    # Per-sample frame parameters as tensors.
    a_vec = torch.full((5,), a0, dtype=torch.float64)
    assert rel_err(model.teleport_frame(x, a_vec, a1, frame=frame), got) < 1e-13
    with pytest.raises(ValueError):
        model.teleport_frame(x, 1.5, a1, frame=frame)
    with pytest.raises(ValueError, match="frame"):
        model.teleport_frame(x, a0, a1, frame="edm2")


def test_frame_conversions_roundtrip():
    s = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    assert torch.allclose(frames.vp_sigma(frames.alpha_bar_from_sigma(s)), s, rtol=1e-10)
    assert torch.allclose(frames.flow_sigma(frames.t_from_sigma(s)), s, rtol=1e-10)
