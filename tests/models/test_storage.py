"""StreamedDeltaMixture: the training-set mixture streamed from disk equals the in-memory DeltaMixture, with
peak memory flat in N under a memory cap smaller than the file."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import gsa_kernels
from gsa_kernels.mixture.storage import StreamedDeltaMixture, write_npy
from helpers import peak_rss_env

SIGMAS = [0.002, 0.01, 0.1, 1.0, 10.0, 80.0]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def clustered_points(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(8, d, generator=g)
    return centres[torch.randint(8, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)


def queries(points, b, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(points.shape[0], (b,), generator=g)
    return points[idx].float() + sigma * torch.randn(b, points.shape[1], generator=g)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra threads only contend (CI runs two workers on two cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("dtype,source", [(torch.float32, "npy"), (torch.float16, "npy"), (torch.bfloat16, "npy"),
                                          (torch.float32, "memmap"), (torch.bfloat16, "tensor")])
def test_streamed_equals_in_memory(tmp_path, dtype, source):
    pts = clustered_points(3000, 24).to(dtype)
    lw = torch.randn(3000, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "points.npy"
    write_npy(path, pts.split(700), 3000, 24, dtype=dtype)
    src = {"npy": path, "memmap": np.load(path, mmap_mode="r"), "tensor": pts}[source]
    read_as = torch.bfloat16 if (dtype == torch.bfloat16 and source != "tensor") else None
    streamed = StreamedDeltaMixture(src, lw, dtype=read_as, chunk_rows=512)   # 6 chunks, the last partial
    in_memory = gsa_kernels.DeltaMixture(pts, lw)
    assert streamed.n_points == 3000 and streamed.dim == 24
    assert rel_err(streamed.center, in_memory.center) < 1e-6
    for s in SIGMAS:
        x = queries(pts, 6, s)
        a, b = streamed(x, s), in_memory(x, s)
        assert rel_err(a.out, b.out) < 1e-6, (s, rel_err(a.out, b.out))
        # log p and the score in float32: each path evaluates its chunks in their own frames, so the two
        # float32 results round differently where the op's float32 accuracy is least (small sigma); the
        # streamed result must be as accurate as the in-memory one, measured against float64.
        exact = gsa_kernels.DeltaMixture(pts.double(), lw.double())
        xd = x.double()
        assert rel_err(a.log_prob, exact.log_prob(xd, s)) <= 2 * rel_err(b.log_prob, exact.log_prob(xd, s)) + 1e-6
        ref_score = exact.score(xd, s)
        assert rel_err(streamed.score(x, s), ref_score) <= 2 * rel_err(in_memory.score(x, s), ref_score) + 3e-6


def test_prefetch_and_uniform_weights_and_float64(tmp_path):
    pts = clustered_points(1000, 16, seed=4).double()
    path = tmp_path / "p.npy"
    np.save(path, pts.numpy())
    ref = gsa_kernels.DeltaMixture(pts)
    for prefetch in (True, False):
        m = StreamedDeltaMixture(str(path), chunk_rows=300, prefetch=prefetch)
        for s in SIGMAS:
            x = queries(pts, 4, s).double()
            assert rel_err(m.denoise(x, s), ref.denoise(x, s)) < 1e-12
            assert rel_err(m.log_prob(x, s), ref.log_prob(x, s)) < 1e-10  # chunk frames: ~eps ||x|| ||p|| / sigma^2


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="points"):
        StreamedDeltaMixture(tmp_path / "missing.npy")
    np.save(tmp_path / "ints.npy", np.zeros((4, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="points"):
        StreamedDeltaMixture(tmp_path / "ints.npy")
    bad = np.ones((10, 3), dtype=np.float32)
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        StreamedDeltaMixture(bad, chunk_rows=4)
    with pytest.raises(ValueError, match="log_weights"):
        StreamedDeltaMixture(np.ones((10, 3), dtype=np.float32), torch.zeros(9))
    with pytest.raises(ValueError, match="chunk_rows"):
        StreamedDeltaMixture(np.ones((10, 3), dtype=np.float32), chunk_rows=0)
    m = StreamedDeltaMixture(np.ones((10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="return_weights"):
        m.partial(torch.ones(2, 3), 1.0, return_weights=True)
    with pytest.raises(ValueError, match="x"):
        m.denoise(torch.ones(2, 4), 1.0)


_CAPPED_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from gsa_kernels.mixture.storage import StreamedDeltaMixture

    def status_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])

    path, cap_mib = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    m = StreamedDeltaMixture(path, chunk_rows=2048)        # the centre pass: warms threads and allocator
    x = torch.load(sys.argv[3])
    m.denoise(x[:1], 1.0)
    # The cap: anonymous memory (heap, buffers) may grow by cap_mib at most; the file is bigger than that.
    limit = (status_kib("VmData") + cap_mib * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    before = status_kib("VmHWM")
    outs = [m.denoise(x, s) for s in (0.002, 0.1, 1.0, 80.0)]
    torch.save(torch.stack(outs), sys.argv[4])
    print(json.dumps({"peak_growth_mib": (status_kib("VmHWM") - before) / 1024,
                      "rss_mib": status_kib("VmRSS") / 1024}))
""")


def test_peak_memory_is_flat_in_n_under_a_cap_smaller_than_the_file(tmp_path):
    d, n_small = 256, 12_288            # 12 MiB and 48 MiB float32 files; cap 32 MiB
    pts = clustered_points(4 * n_small, d, seed=5)
    x = queries(pts[:n_small], 8, 0.1)  # in distribution for both sizes (points of the smaller set)
    torch.save(x, tmp_path / "x.pt")
    growth = {}
    for n in (n_small, 4 * n_small):
        path = tmp_path / f"p{n}.npy"
        write_npy(path, pts[:n].split(4096), n, d)
        out = subprocess.run([sys.executable, "-c", _CAPPED_SCRIPT, str(path), "32", str(tmp_path / "x.pt"),
                              str(tmp_path / f"out{n}.pt")], capture_output=True, text=True, timeout=300,
                             env=peak_rss_env(threads=1))
        assert out.returncode == 0, out.stderr[-2000:]
        growth[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]
        ref = gsa_kernels.DeltaMixture(pts[:n])
        got = torch.load(tmp_path / f"out{n}.pt")
        for i, s in enumerate((0.002, 0.1, 1.0, 80.0)):
            assert rel_err(got[i], ref.denoise(x, s)) < 1e-6
    file_mib = 4 * n_small * d * 4 / 2**20
    assert growth[4 * n_small] < file_mib / 4, growth          # far below the 48 MiB file
    assert abs(growth[4 * n_small] - growth[n_small]) < 1, growth  # flat in N (MiB)
