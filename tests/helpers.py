"""The one helper module of the test suite: tolerances, error norms, random models and inputs, and the
path to examples/. Test modules import from here (never from each other); fixtures live in conftest.py."""
import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import gsa_kernels as gk
from gsa_kernels.gaussian import reference as gref

REPO_ROOT = Path(__file__).resolve().parents[1]


def import_example(name: str):
    """A module of examples/ (experiments kept out of the wheel), imported by path."""
    examples = str(REPO_ROOT / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)  # examples import their siblings by name
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


SIGMAS = [0.002, 0.01, 0.1, 1.0, 10.0, 80.0]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_gaussian(d, r, *, lam_perp=0.25, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    # Eigenvalues spread over five decades, as in image data.
    eig = torch.logspace(1, -4, r, dtype=torch.float64) * (0.5 + torch.rand(r, generator=g, dtype=torch.float64))
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    lp = torch.tensor(lam_perp if r < d else 0.0, dtype=torch.float64)
    return [t.to(dtype).contiguous() for t in (mean, basis, eig, lp)]


F32_DENOISE_TOL = 1e-5   # the denoiser contract is 1e-4; measured ~3e-8


def gen(seed):
    return torch.Generator().manual_seed(seed)


def close_points(n, d, seed=0, offset=10.0, spread=0.05):
    """The hard case of docs/math.md section 3.1: points close together relative to their norms. float32-exact values."""
    return (offset + spread * torch.randn(n, d, generator=gen(seed), dtype=torch.float64)).float().double()


def queries(centres, batch, sigma, seed=1):
    """x = a random centre + sigma * noise, rounded to float32 (so float32 and float64 runs see the same x)."""
    g = gen(seed)
    idx = torch.randint(0, centres.shape[0], (batch,), generator=g)
    s = sigma if isinstance(sigma, float) else sigma[:, None]
    return (centres[idx] + s * torch.randn(batch, centres.shape[1], generator=g, dtype=torch.float64)).float().double()


def random_gmm(K, d, r, seed=0, with_lam_perp=True):
    """GMM parameters (float32-exact except the bases, which stay orthonormal in float64): eigenvalues over
    four decades, lam_perp [K]."""
    g = gen(seed)
    means = (2 * torch.randn(K, d, generator=g, dtype=torch.float64)).float().double()
    bases = torch.linalg.qr(torch.randn(K, d, r, generator=g, dtype=torch.float64))[0] if r else None
    spread = 0.5 + torch.rand(K, r, generator=g, dtype=torch.float64)
    eig = torch.logspace(0, -3, r, dtype=torch.float64) * spread if r else None
    lam_perp = (0.05 * torch.rand(K, generator=g, dtype=torch.float64)).float().double() if with_lam_perp else None
    lw = torch.randn(K, generator=g, dtype=torch.float64).float().double()
    if r:
        eig = eig.float().double()
    return lw, means, bases, eig, lam_perp


def as_dtype(ts, dtype):
    return [None if t is None else t.to(dtype) for t in ts]


def gaussian_model(d=8, r=5, lam_perp=0.05, dtype=torch.float64, seed=0, lam_range=(0.05, 4.0)):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    lo, hi = math.log(lam_range[0]), math.log(lam_range[1])
    eig = torch.exp(lo + (hi - lo) * torch.rand(r, generator=g, dtype=torch.float64))
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    return gk.GaussianModel(mean.to(dtype), basis.to(dtype), eig.to(dtype), lam_perp)


def reference_teleport(model, x, s0, s1):
    return gref.teleport(x.double(), model.mean.double(), model.basis.double(), model.eigvals.double(),
                         model.lam_perp.double(), s0, s1)


def nonlinear_denoiser(model):
    """A Gaussian denoiser plus a smooth nonlinearity: a stand-in network for solver comparisons."""
    def denoise(x, sigma):
        return model.denoise(x, sigma) + 0.3 * torch.tanh(2 * x) / (1 + sigma.reshape(-1, 1))
    return denoise


class HostSyncDetector(TorchFunctionMode):
    """Flags every tensor -> host conversion (each one would synchronise a GPU and break graph capture)
    and every torch.tensor(host data) (a host-to-device copy on a GPU, which graph capture forbids too)."""
    FORBIDDEN = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "nonzero", "cpu",
                 "tensor"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.FORBIDDEN:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


# Peak-RSS measurement in a fresh process. A fixed malloc mmap threshold makes every large buffer a fresh
# mapping, returned on free, so the peak RSS above a baseline counts exactly the live temporaries.
_PEAK_RSS_PREAMBLE = """
import torch, gsa_kernels
torch.set_num_threads(2)
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM)
"""


def peak_rss_env(threads: int) -> dict[str, str]:
    """Environment of a peak-RSS measurement process: the fixed mmap threshold (otherwise glibc raises it
    after the first large free and keeps freed buffers in its heap, 1.5-3.5 MiB more or less from run to run
    depending on unrelated small allocations) and `threads` OpenMP threads."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))


def run_peak_rss_script(body: str, timeout: int = 120) -> list[int]:
    """Run the script `body` (after a preamble defining kib(field) and reset_peak()) in a new process and
    return the integers it prints last, e.g. peak KiB above a baseline for each size it tried."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs to reset the peak RSS")
    res = subprocess.run([sys.executable, "-c", _PEAK_RSS_PREAMBLE + textwrap.dedent(body)], capture_output=True,
                         text=True, timeout=timeout, env=peak_rss_env(threads=2))
    assert res.returncode == 0, res.stderr
    return [int(v) for v in res.stdout.strip().splitlines()[-1].split()]
