"""The Python functions registered as the ops' CUDA kernels, run on CPU tensors under the Triton
interpreter. Without a GPU the dispatcher never reaches them, so this is what checks their glue (dtype
casts, contiguity, per-sample sigma vectors, output shapes) before they run on a GPU."""
import pytest
import torch

from gsa_kernels.gaussian import cuda as gcuda
from gsa_kernels.gaussian import reference as GR
from gsa_kernels.gaussian.map_kind import OP_MAP_KINDS
from gsa_kernels.mixture import cuda as mcuda
from gsa_kernels.mixture import reference as MR
from helpers import random_gaussian, rel_err

pytestmark = [pytest.mark.matrix,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run these kernels for real")]


@pytest.mark.parametrize("op", ["gaussian_denoise", "gaussian_score", "teleport"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_gaussian_cuda_wrapper(op, dtype):
    mean, basis, eig, lp = random_gaussian(36, 12, dtype=torch.float32, seed=5)
    basis_strided = basis.T.contiguous().T  # non-contiguous parameter
    x = (mean + 2 * torch.randn(2, 36)).reshape(2, 4, 3, 3).to(dtype).to(memory_format=torch.channels_last)
    s = torch.tensor([0.05, 3.0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    sigmas = (s, s * 0.1) if op == "teleport" else (s,)
    out = gcuda.map_cuda(OP_MAP_KINDS[op])(x, mean, basis_strided, eig, lp, *sigmas)
    assert out.shape == x.shape and out.dtype == dtype
    want = getattr(GR, op)(x.double(), mean.double(), basis.double(), eig.double(), lp.double(),
                           *[t.double() for t in sigmas])
    assert rel_err(out, want) < {torch.float32: 1e-5, torch.float16: 3e-3, torch.float64: 1e-6}[dtype]


def test_project_cuda_wrapper():
    mean, basis, _, _ = random_gaussian(20, 7, dtype=torch.float32)
    x = torch.randn(3, 4, 5)
    c = gcuda.project_cuda(x, mean, basis)
    assert c.shape == (3, 7)
    assert rel_err(c, GR.project(x.double(), mean.double(), basis.double())) < 1e-5


def test_mixture_cuda_wrappers():
    g = torch.Generator().manual_seed(0)
    pts = 3 + 0.1 * torch.randn(24, 2, 3, 3, generator=g, dtype=torch.float64).reshape(24, -1)
    x = (pts[:5] + 0.2 * torch.randn(5, 18, generator=g, dtype=torch.float64)).reshape(5, 2, 3, 3)
    sigma = torch.full((5,), 0.3)
    out, log_z = mcuda.delta_mixture_forward_cuda(x.float(), pts.float(), None, sigma)
    assert out.shape == x.shape and log_z.shape == (5,)
    assert rel_err(out, MR.delta_mixture_denoise(x.reshape(5, -1), pts, None, 0.3).reshape(x.shape)) < 1e-5
    # A GMM built from the same points (r = 0, lam_perp = 0) is the same mixture.
    lw = torch.zeros(24)
    out_g, log_z_g, w = mcuda.gmm_forward_cuda(x.float(), lw, pts.float(), None, None, None, sigma, return_weights=True)
    assert rel_err(out_g, out) < 1e-5 and w.shape == (5, 24)
    assert torch.allclose(w.sum(1), torch.ones(5), atol=1e-5)
