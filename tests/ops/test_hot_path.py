"""The GPU hot path without a GPU: the Python CUDA kernels on CPU tensors with the Triton launches stubbed
(no host sync, cached parameter casts), the merge's immunity to TF32 flags, the precision modes, launch
configuration (grid limits, occupancy-aware splits, device guard, 64-bit offsets) and the value checks
the CUDA wrappers share with the CPU ops. Kernels that run here run under TRITON_INTERPRET=1."""
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import gsa_kernels
from benchmarks.cases.overhead import TorchOpRecorder, host_counts, stubbed_cuda_calls, stubbed_triton_launch
from gsa_kernels import config
from gsa_kernels._core import cache as cache_mod
from gsa_kernels._core import launch
from gsa_kernels.gaussian.map_kind import DENOISE, TELEPORT
from gsa_kernels.mixture import reference as MR
from helpers import HostSyncDetector, close_points, gen, queries, random_gaussian, rel_err

interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter checks; a GPU runs the real ones")


def _mixture_cuda():
    from gsa_kernels.mixture import cuda

    return cuda


# ---------------------------------------------------------------------------------------------
# Host path.
def test_stubbed_cuda_path_makes_no_host_sync():
    with stubbed_triton_launch():
        calls = stubbed_cuda_calls(64, torch.device("cpu"))
        for fn in calls.values():
            fn()  # first calls fill the caches (value checks of new parameter tensors read them once)
        with HostSyncDetector() as detector:
            for fn in calls.values():
                fn()
    assert detector.seen == []


def test_parameter_casts_are_cached_until_written():
    t = torch.randn(8, 3, dtype=torch.float64).t()  # non-contiguous float64: needs a copy
    a = cache_mod.as_contiguous(t, torch.float32)
    assert a.is_contiguous() and a.dtype == torch.float32
    assert cache_mod.as_contiguous(t, torch.float32) is a  # unchanged source: the same copy
    t.mul_(2)  # an in-place write bumps the version: a fresh copy
    b = cache_mod.as_contiguous(t, torch.float32)
    assert b is not a and torch.equal(b, t.float())
    ready = torch.randn(4)
    assert cache_mod.as_contiguous(ready, torch.float32) is ready  # no copy, no entry


def test_cache_never_returns_a_value_of_a_freed_tensor():
    c = cache_mod.DerivedCache()
    t = torch.randn(3)
    assert c.get("sum", (t,), lambda: float(t.sum())) == pytest.approx(float(t.sum()))
    assert len(c) == 1
    del t  # the entry goes with its source
    assert len(c) == 0
    with torch.inference_mode():
        u = torch.randn(3)
    assert c.get("sum", (u,), lambda: 1.0) == 1.0 and len(c) == 0  # no version counter: not cached


def test_center_is_computed_once_per_points_tensor(monkeypatch):
    cuda = _mixture_cuda()
    counted = []
    real = cuda.mean_of_rows
    monkeypatch.setattr(cuda, "mean_of_rows", lambda t: counted.append(1) or real(t))
    pts = torch.randn(20, 6)
    c1 = cuda._center(None, pts)
    c2 = cuda._center(None, pts)
    assert c1 is c2 and len(counted) == 1
    pts.add_(1.0)
    assert torch.allclose(cuda._center(None, pts), pts.double().mean(0)) and len(counted) == 2


# ---------------------------------------------------------------------------------------------
# The merge under global TF32 flags.
MATMUL_OPS = {"mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm", "einsum", "dot", "vdot", "mv", "addmv",
              "linear", "tensordot", "_addmm_activation"}


@interpreter_only
def test_merge_path_issues_no_matmul_under_tf32_flags():
    cuda = _mixture_cuda()
    pts = close_points(40, 20, offset=1.0, spread=1.0).float()
    x = queries(pts.double(), 5, 0.5).float()
    sigma = torch.full((5,), 0.5)
    lw, means = torch.randn(6, generator=gen(2)), 2 * torch.randn(6, 20, generator=gen(3))
    bases = torch.linalg.qr(torch.randn(6, 20, 4, generator=gen(4)))[0].contiguous()
    eig, lam_perp = torch.rand(6, 4, generator=gen(5)), torch.full((6,), 0.1)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        with TorchOpRecorder() as rec:
            d_out, _ = cuda.delta_mixture_forward_cuda(x, pts, None, sigma)
            g_out, _, _ = cuda.gmm_forward_cuda(x, lw, means, bases, eig, lam_perp, sigma, None, False, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])
    assert not MATMUL_OPS & set(rec.ops), sorted(MATMUL_OPS & set(rec.ops))
    assert rel_err(d_out, MR.delta_mixture_denoise(x.double(), pts.double(), None, 0.5)) < 1e-5
    ref = gsa_kernels.gmm_forward(x.double(), lw.double(), means.double(), bases.double(), eig.double(),
                                  lam_perp.double(), 0.5).out
    assert rel_err(g_out, ref) < 1e-5


# The host work of one call besides its Triton launches, counted rather than timed (counts do not depend on
# the load of the machine; the overhead benchmark reports the microseconds): (PyTorch ops, allocating ops,
# Python function calls). Each PyTorch op is a kernel launch or an allocator call on a GPU -- denoise: the
# output and the floored sigma; the mixtures: sigma^2 (2 ops), zeroing the reused accumulator, the
# merge's two outputs, for GMM the empty weights. Scratch tensors are reused, launch plans are looked up.
HOST_CEILINGS = {"denoise": (2, 2, 36), "delta_mixture_forward": (5, 3, 48), "gmm_forward": (6, 4, 56)}


def test_stubbed_cuda_path_stays_within_its_host_work_ceilings():
    with stubbed_triton_launch():
        calls = stubbed_cuda_calls(64, torch.device("cpu"))
        for op, fn in calls.items():
            fn()  # fills the caches: plans, scratch tensors, value checks
            counts = host_counts(fn)
            ops, allocations, python_calls = HOST_CEILINGS[op]
            assert len(counts["torch_ops"]) <= ops, (op, counts)
            assert counts["allocations"] <= allocations, (op, counts)
            assert counts["python_calls"] <= python_calls, (op, counts)
            assert host_counts(fn) == counts  # the same work on every later call


def test_op_recorder_counts_allocations_not_views_or_in_place_ops():
    t = torch.ones(4)
    with TorchOpRecorder() as rec:
        t.view(2, 2)
        t.mul_(2)
        torch.empty(3)
        t * t
    assert rec.ops == ["view", "mul_", "empty", "mul"] and rec.allocations == 2


# The public Gaussian API on CPU at B = 1, counted the same way: one PyTorch op (the op itself; a number
# sigma comes from the cache, not a fresh tensor) and (Python calls with a [B] tensor sigma, with number
# sigmas). The frames: the model method, its parameter read, the ops function, sigma_arg per sigma, call_op
# and torch.compiler.is_compiling (2); a number sigma adds is_compiling (2) and the cache look-up. Every
# check still runs: in the C++ op on CPU, in sigma_arg for what the op cannot see.
API_CEILINGS = {"denoise": (7, 10), "score": (7, 10), "teleport": (8, 14)}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad_mode"])
def test_gaussian_api_per_call_host_work(grad):
    mean, basis, eig, lp = random_gaussian(8, 8, dtype=torch.float32)
    model = gsa_kernels.GaussianModel(mean, basis, eig, lp)
    x = torch.randn(1, 8)
    s_from, s_to = torch.full((1,), 2.0), torch.full((1,), 0.5)
    calls = {
        "denoise": (lambda: model.denoise(x, s_to), lambda: model.denoise(x, 0.5)),
        "score": (lambda: model.score(x, s_to), lambda: model.score(x, 0.5)),
        "teleport": (lambda: model.teleport(x, s_from, s_to), lambda: model.teleport(x, 2.0, 0.5)),
    }
    with torch.set_grad_enabled(grad):
        for op, fns in calls.items():
            for fn, ceiling in zip(fns, API_CEILINGS[op]):
                fn()
                counts = host_counts(fn)
                assert counts["torch_ops"] == [op if op == "teleport" else "gaussian_" + op], (op, counts)
                assert counts["allocations"] == 1, (op, counts)  # the output only
                assert counts["python_calls"] <= ceiling, (op, counts)
                assert host_counts(fn) == counts


def test_number_sigma_tensors_are_reused_only_while_unwritten():
    from gsa_kernels._validation import _CPU_SIGMAS_MAX, _cpu_sigmas, sigma_arg

    x = torch.randn(3, 5)
    a = sigma_arg("sigma", 0.25, x, dtype=torch.float32)
    assert a.shape == (3,) and torch.equal(a, torch.full((3,), 0.25))
    assert sigma_arg("sigma", 0.25, x, dtype=torch.float32) is a      # the same number: the same tensor
    assert sigma_arg("sigma", 0.25, x, dtype=torch.float64) is not a  # another dtype, batch or value: its own
    assert sigma_arg("sigma", 0.25, x[:2], dtype=torch.float32).shape == (2,)
    a.mul_(4)  # written in place (e.g. by code that reached it through an autograd graph): never reused
    b = sigma_arg("sigma", 0.25, x, dtype=torch.float32)
    assert b is not a and torch.equal(b, torch.full((3,), 0.25))
    with torch.inference_mode():  # made in inference mode: still a normal tensor, usable outside it
        c = sigma_arg("sigma", 0.75, x, dtype=torch.float32)
    assert not c.is_inference() and sigma_arg("sigma", 0.75, x, dtype=torch.float32) is c
    for k in range(3 * _CPU_SIGMAS_MAX):
        sigma_arg("sigma", 1.0 + k, x, dtype=torch.float32)
    assert len(_cpu_sigmas) <= _CPU_SIGMAS_MAX
    with pytest.raises(ValueError, match="sigma = 1e\\+39 is beyond the range"):
        sigma_arg("sigma", 1e39, x, dtype=torch.float32)


def test_number_and_tensor_sigma_give_the_same_result_every_call():
    """The cached sigma tensors behind number sigmas: repeated calls, an in-place write to a cached tensor
    in between, and a graph that keeps one as an input all give the tensor-sigma result."""
    from gsa_kernels._validation import _cpu_sigmas

    mean, basis, eig, lp = random_gaussian(12, 5, lam_perp=0.3)
    model = gsa_kernels.GaussianModel(mean, basis, eig, lp)
    x = torch.randn(4, 12, dtype=torch.float64)
    want = model.teleport(x, torch.full((4,), 1.5, dtype=torch.float64), torch.full((4,), 0.3, dtype=torch.float64))
    for _ in range(3):
        assert torch.equal(model.teleport(x, 1.5, 0.3), want)
        for t, _version in list(_cpu_sigmas.values()):
            t.fill_(7.0)
    xg, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = model.denoise(xg, 0.4)                 # the graph keeps the cached sigma tensor ...
    model.score(x, 0.4)                          # ... which later calls of that number share
    out.sum().backward()
    model.denoise(xt, torch.full((4,), 0.4, dtype=torch.float64)).sum().backward()
    assert torch.equal(xg.grad, xt.grad)


# ---------------------------------------------------------------------------------------------
# Scratch tensors reused between calls.
class _CudaLike:
    """Stands in for a CUDA tensor in Workspaces.get (device 0; the stream is the test's to set)."""
    is_cuda = True

    @staticmethod
    def get_device():
        return 0


def test_workspaces_are_kept_per_key_thread_and_stream_and_never_during_capture(monkeypatch):
    import threading

    ws = cache_mod.Workspaces(max_entries=2, max_bytes=1024)
    made = []

    def make(n=4):
        made.append(torch.empty(n))
        return (made[-1],)

    cpu = torch.zeros(1)
    a = ws.get("k", cpu, make)
    assert ws.get("k", cpu, make) is a and len(made) == 1          # reused
    assert ws.get("other", cpu, make) is not a and len(made) == 2   # another signature
    other_thread = []
    worker = threading.Thread(target=lambda: other_thread.append(ws.get("k", cpu, make)))
    worker.start()
    worker.join()
    assert other_thread[0] is not a                                # another thread: its own
    assert ws.get("big", cpu, lambda: make(1024)) is not ws.get("big", cpu, lambda: make(1024))  # > max_bytes
    stream, capturing = [7], [False]
    monkeypatch.setattr(cache_mod, "_raw_stream", lambda index: stream[0])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    on_7 = ws.get("k", _CudaLike, make)
    assert ws.get("k", _CudaLike, make) is on_7
    stream[0] = 8
    assert ws.get("k", _CudaLike, make) is not on_7                # another stream: its own
    capturing[0] = True
    n = len(made)
    ws.get("k", _CudaLike, make)
    ws.get("k", _CudaLike, make)
    assert len(made) == n + 2                                      # capture: fresh every call
    assert len(ws.held()) <= 2                                     # least recently used out


@interpreter_only
def test_reused_scratch_tensors_are_rewritten_every_call():
    """Two calls of each op with the scratch tensors of the first poisoned with NaN in between: the second
    matches the float64 reference (the accumulator is zeroed, the partial states rewritten)."""
    from gsa_kernels.gaussian import reference as R
    from gsa_kernels.gaussian import triton_gaussian as T

    cuda = _mixture_cuda()
    pts = close_points(40, 20, offset=1.0, spread=1.0).float()
    lw, means = torch.randn(6, generator=gen(2)), 2 * torch.randn(6, 20, generator=gen(3))
    bases = torch.linalg.qr(torch.randn(6, 20, 4, generator=gen(4)))[0].contiguous()
    eig, lam_perp = torch.rand(6, 4, generator=gen(5)), torch.full((6,), 0.1)
    mean, basis, g_eig, g_lp = random_gaussian(20, 5, seed=6)
    f32 = [t.float().contiguous() for t in (mean, basis, g_eig, g_lp)]
    for sigma in (0.7, 0.3):
        for t in cache_mod.workspaces.held():
            t.fill_(float("nan"))
        x = queries(pts.double(), 3, sigma).float()
        s = torch.full((3,), sigma)
        d_out, _ = cuda.delta_mixture_forward_cuda(x, pts, None, s)
        assert rel_err(d_out, MR.delta_mixture_denoise(x.double(), pts.double(), None, sigma)) < 1e-5
        g_out, _, w = cuda.gmm_forward_cuda(x, lw, means, bases, eig, lam_perp, s, None, False, True)
        ref = gsa_kernels.gmm_forward(x.double(), lw.double(), means.double(), bases.double(), eig.double(),
                                      lam_perp.double(), sigma, return_weights=True)
        assert rel_err(g_out, ref.out) < 1e-5 and rel_err(w, ref.weights) < 1e-5
        out = torch.full((3, 20), float("nan"))
        T.gaussian_map(DENOISE, x, *f32, s, s, out)
        assert rel_err(out, R.gaussian_denoise(x.double(), mean, basis, g_eig, g_lp, sigma)) < 1e-5
    assert cache_mod.workspaces.held()  # the calls did keep scratch tensors


@interpreter_only
@pytest.mark.parametrize("shape", [(), (1,), (3,)])
@pytest.mark.parametrize("sigma_dtype", [torch.float32, torch.float64])
def test_cuda_wrappers_take_scalar_one_and_per_row_sigma_tensors(shape, sigma_dtype):
    """The sigma vector the kernels get (floored sigma, sigma^2) from every accepted sigma shape and dtype,
    with the fewest ops: the same answer as a [B] float32 sigma, within float32 of the float64 reference."""
    from gsa_kernels.gaussian import cuda as gcuda
    from gsa_kernels.gaussian import reference as R

    cuda = _mixture_cuda()
    mean, basis, eig, lp = random_gaussian(20, 5, seed=7)
    f32 = [t.float() for t in (mean, basis, eig, lp)]
    pts = close_points(30, 20, offset=1.0, spread=1.0).float()
    x = queries(pts.double(), 3, 0.4).float()
    values = torch.tensor([0.4, 0.4, 0.4])[:shape[0]] if shape else torch.tensor(0.4)
    sigma = values.to(sigma_dtype)
    out = gcuda.map_cuda(DENOISE)(x, *f32, sigma)
    assert rel_err(out, R.gaussian_denoise(x.double(), mean, basis, eig, lp, 0.4)) < 1e-5
    d_out, log_z = cuda.delta_mixture_forward_cuda(x, pts, None, sigma)
    assert rel_err(d_out, MR.delta_mixture_denoise(x.double(), pts.double(), None, 0.4)) < 1e-5
    _, ref_log_z = cuda.delta_mixture_forward_cuda(x, pts, None, torch.full((3,), 0.4))
    assert torch.equal(log_z, ref_log_z)


# ---------------------------------------------------------------------------------------------
# Precision modes.
def test_auto_precision_is_tf32x3_on_tensor_cores_only():
    assert config.get_precision() == "auto"
    assert config.default_precision((9, 0)) == "tf32x3" and config.default_precision((8, 0)) == "tf32x3"
    assert config.default_precision((7, 5)) == "ieee" and config.default_precision(None) == "ieee"
    assert config.kernel_precision(torch.device("cpu")) == "ieee"
    with config.precision("ieee"):
        assert config.kernel_precision(torch.device("cpu")) == "ieee"
    with config.precision("tf32"):
        assert config.kernel_precision(torch.device("cpu")) == "tf32"
    with pytest.raises(ValueError, match="precision"):
        config.set_precision("fp16")


@interpreter_only
@pytest.mark.parametrize("precision,tol", [("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 3e-3)])
def test_each_precision_mode_runs_within_its_tolerance(precision, tol):
    from gsa_kernels.gaussian import reference as R
    from gsa_kernels.gaussian import triton_gaussian as T

    mean, basis, eig, lp = random_gaussian(40, 12, seed=3)
    x = mean + 2 * torch.randn(3, 40, dtype=torch.float64, generator=gen(1))
    s = torch.full((3,), 1.5)
    out = torch.empty(3, 40)
    f32 = [t.float().contiguous() for t in (mean, basis, eig, lp)]
    T.gaussian_map(TELEPORT, x.float(), *f32, s, s * 0.5, out, precision)
    assert rel_err(out, R.teleport(x, mean, basis, eig, lp, 1.5, 0.75)) < tol


# ---------------------------------------------------------------------------------------------
# Launch configuration.
class _GridRecorder:
    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


def test_gaussian_grids_fold_into_one_axis_beyond_65535_tiles(monkeypatch):
    from gsa_kernels.gaussian import triton_gaussian as T

    d = 64 * 70000  # 70000 column tiles: more than a y axis holds
    proj, recon = _GridRecorder(), _GridRecorder()
    monkeypatch.setattr(T, "_project_scale_kernel", proj)
    monkeypatch.setattr(T, "_reconstruct_kernel", recon)
    x = torch.zeros(1, d)
    basis = torch.zeros(d, 1)
    small = torch.zeros(1)
    T.gaussian_map(DENOISE, x, x[0], basis, small, small, small, small, torch.empty(1, d))
    assert proj.grids == [(1,)] and recon.grids == [(70000,)]


def test_wave_splits_fill_one_wave_within_the_caps():
    # 132 SMs, 1 CTA per SM (230 registers x 8 warps): 4 row tiles -> 33 splits = 132 CTAs, one wave.
    per_sm = launch.ctas_per_sm(230, 8, 0)
    assert per_sm == 1
    assert launch.wave_splits(4, 132 * per_sm, 10_000, 10_000) == 33
    assert launch.wave_splits(5, 132, 10_000, 10_000) == 26        # 130 CTAs: no partial second wave
    assert launch.wave_splits(200, 132, 10_000, 10_000) == 1       # rows alone fill the GPU
    assert launch.wave_splits(4, 132, 7, 10_000) == 7              # few work items
    assert launch.wave_splits(4, 132, 10_000, 3) == 3              # workspace cap
    # registers, threads and shared memory each limit the resident CTAs
    assert launch.ctas_per_sm(128, 4, 0) == 1 * 65536 // (128 * 32 * 4)
    assert launch.ctas_per_sm(32, 1, 0) == 32
    assert launch.ctas_per_sm(32, 4, 100_000, shared_per_sm=233472) == 2


def test_split_count_is_deterministic_without_a_device():
    assert launch.split_count(None, torch.device("cpu"), 1, 1000, 10, None, None, 1 << 25) == 1


def test_launches_run_under_the_device_guard_of_x(monkeypatch):
    from gsa_kernels.gaussian import triton_gaussian as T

    entered = []

    class Guard:
        def __init__(self, t):
            entered.append(t.device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(T, "device_guard", Guard)
    monkeypatch.setattr(T, "_project_scale_kernel", _GridRecorder())
    monkeypatch.setattr(T, "_reconstruct_kernel", _GridRecorder())
    small = torch.zeros(1)
    T.gaussian_map(DENOISE, torch.zeros(2, 8), torch.zeros(8), torch.zeros(8, 2), torch.zeros(2), small, small,
                   small, torch.empty(2, 8))
    assert entered == [torch.device("cpu")]
    assert isinstance(launch.device_guard(torch.zeros(1)), type(launch.device_guard(torch.zeros(2))))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu_run_there():
    params = [t.float().to("cuda:1") for t in random_gaussian(64, 8)]
    x = params[0] + torch.randn(4, 64, device="cuda:1")
    with torch.cuda.device(0):
        out = gsa_kernels.gaussian_denoise(x, *params, 0.5)
    assert out.device == torch.device("cuda:1")
    want = gsa_kernels.gaussian_denoise(x.cpu(), *[p.cpu() for p in params], 0.5)
    assert rel_err(out.cpu(), want) < 1e-5


def _ttir_i32_products_of(kernel, args, size_args):
    """Lines of the kernel's TTIR that multiply one of size_args (or a splat of it) in 32-bit integers."""
    from gsa_kernels import triton_aot

    ttir = triton_aot.compile_launch_case(kernel, args).asm["ttir"]
    runtime = [p.name for p in kernel.params if not p.is_constexpr]
    header = re.search(r"tt\.func public @\w+\((.*?)\)\s*(attributes|\{)", ttir, re.S).group(1)
    arg_names = re.findall(r"(%\w+):", header)
    aliases = {arg_names[runtime.index(n)] for n in size_args}
    bad = []
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w#]+) = (tt\.splat|tt\.broadcast|tt\.expand_dims) (%[\w#]+)", line)
        if m and m.group(3) in aliases:
            aliases.add(m.group(1))
        if "arith.muli" in line and re.search(r"(: i32\b|xi32>)", line):
            operands = set(re.findall(r"%[\w#]+", line.split("=", 1)[1]))
            if operands & aliases:
                bad.append(line.strip())
    return bad


def test_row_offsets_are_64_bit():
    """Every product with the row length d (or r) is formed in int64 (B d and d r may exceed 2^31): read
    from the TTIR of each kernel compiled for sm_90 (a subprocess: compiling needs TRITON_INTERPRET unset)."""
    code = "import json, re\n" + inspect.getsource(_ttir_i32_products_of) + (
        "from gsa_kernels.gaussian import triton_gaussian as G\n"
        "from gsa_kernels.mixture import triton_mixture as M\n"
        "cases = list(G.aot_cases())[2:4] + list(M.aot_cases())[0:1] + list(M.aot_cases())[4:5]\n"
        "bad = {k.__name__: _ttir_i32_products_of(k, a, [n for n in ('D', 'R') if n in a]) for k, a in cases}\n"
        "print(json.dumps(bad))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(bad) == {"_project_scale_kernel", "_reconstruct_kernel", "_delta_partial_kernel",
                        "_gmm_partial_kernel"}
    assert all(not v for v in bad.values()), bad


# ---------------------------------------------------------------------------------------------
# The CUDA wrappers reject what the CPU ops reject.
@interpreter_only
def test_cuda_wrappers_reject_all_neg_inf_log_weights_once_per_tensor_version(monkeypatch):
    cuda = _mixture_cuda()
    pts = torch.randn(12, 5, generator=gen(0))
    x = torch.randn(2, 5, generator=gen(1))
    sigma = torch.ones(2)
    bad = torch.full((12,), float("-inf"))
    with pytest.raises(ValueError, match="log_weights"):
        gsa_kernels.delta_mixture_forward(x, pts, bad, 1.0)  # the CPU op
    with pytest.raises(ValueError, match="log_weights"):
        cuda.delta_mixture_forward_cuda(x, pts, bad, sigma)
    with pytest.raises(ValueError, match="log_weights"):
        cuda.gmm_forward_cuda(x, bad, pts, None, None, None, sigma)
    with pytest.raises(ValueError, match="eigvals"):
        cuda.gmm_forward_cuda(x, torch.zeros(12), pts, torch.zeros(12, 5, 1), -torch.ones(12, 1), None, sigma)
    good = torch.zeros(12)
    checks = []
    real = cuda.check_log_weights
    monkeypatch.setattr(cuda, "check_log_weights", lambda t: checks.append(1) or real(t))
    cuda.delta_mixture_forward_cuda(x, pts, good, sigma)
    cuda.delta_mixture_forward_cuda(x, pts, good, sigma)
    assert len(checks) == 1  # checked once while unchanged
    good.fill_(float("-inf"))  # written in place: checked again
    with pytest.raises(ValueError, match="-inf everywhere"):
        cuda.delta_mixture_forward_cuda(x, pts, good, sigma)
