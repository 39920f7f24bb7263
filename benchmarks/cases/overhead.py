"""Per-call overhead at B = 1, d = 3072 (full rank): what a sampler pays per call when the kernel itself
is tiny. GPU only in the default run (on a CPU the host time *is* the op time); `--ops overhead` runs it
on the CPU too, without the CUDA-graph rows.

Rows: host time per call (the loop issues calls without synchronising, so on CUDA this is the launch
cost the host pays) and latency per call (synchronised after every call), for the Python API with
validation on and off, with a float sigma, the raw torch.ops.gsa call and the eager reference; on CUDA,
one CUDA-graph replay of the op: host time per replay, device time per replay, and whether the
replayed output matches the eager call. On a CPU, the "cuda kernel, launch stubbed" row runs the
Python CUDA kernel on CPU tensors with every Triton launch replaced by a no-op -- for denoise, the
training-set op and the GMM op (the mixture rows include the merge): the host time the GPU path adds.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch
from gsa_kernels.gaussian.map_kind import DENOISE
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..harness.environment import sync
from ..harness.run import RunOptions
from ..harness.timing import time_call
from .gaussian import GaussianParams

FAMILY = "overhead"
OPS = ("overhead",)
DIM = {"tiny": 192, "quick": 3072, "full": 3072}


def available() -> str | None:
    return None


def _row(d, backend, kind, **values) -> dict:
    row = {"family": FAMILY, "op": "denoise", "config": {"d": d, "r": d}, "config_str": f"d={d} r={d}",
           "batch": 1, "backend": backend, "kind": kind, "precision": "ieee", "status": "ok", "reason": None,
           "host_s": None, "median_s": None, "graph_s": None, "note": None}
    row.update(values)
    return row


def _host_and_latency(fn, device, calls, blocks=10):
    """(host seconds per call: median over blocks of unsynchronised calls; latency: median of
    synchronised calls)."""
    for _ in range(10):
        fn()
    sync(device)
    per_block = max(1, calls // blocks)
    host_blocks = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            fn()
        host_blocks.append((time.perf_counter() - start) / per_block)
        sync(device)  # keep the launch queue from filling up between blocks
    host = statistics.median(host_blocks)
    latencies = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        sync(device)
        latencies.append(time.perf_counter() - start)
    return host, statistics.median(latencies)


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


STUBBED_KERNELS = {"gsa_kernels.gaussian.triton_gaussian": ("_project_scale_kernel", "_reconstruct_kernel"),
                   "gsa_kernels.mixture.triton_mixture": ("_delta_partial_kernel", "_gmm_partial_kernel"),
                   "gsa_kernels._core.triton_lse": ("_merge_kernel",)}


@contextlib.contextmanager
def stubbed_triton_launch():
    """Every Triton kernel of the package replaced by a no-op launch (outputs stay unwritten): the CUDA
    kernels (gaussian/cuda.py, mixture/cuda.py) then run their whole Python path -- meta check, cached
    casts, workspaces, launch configuration, the merge -- on CPU tensors."""
    import importlib

    saved = []
    try:
        for mod_name, names in STUBBED_KERNELS.items():
            mod = importlib.import_module(mod_name)
            for name in names:
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, _NoLaunch())
        yield
    finally:
        for mod, name, kernel in saved:
            setattr(mod, name, kernel)


def stubbed_cuda_calls(d: int, device, seed: int = 0) -> dict:
    """op -> a call of its Python CUDA kernel at B = 1 on `device` (CPU tensors), for use inside
    stubbed_triton_launch(): Gaussian denoise (full rank), training set (N = 256 points), GMM (K = 8,
    r = 16), each with the arguments a model passes (float32 parameters, a [1] sigma tensor)."""
    from gsa_kernels.gaussian import cuda as gaussian_cuda
    from gsa_kernels.mixture import cuda as mixture_cuda

    params = GaussianParams(d, d, device, seed)
    gen = params.gen
    x = params.mean + torch.randn(1, d, device=device, generator=gen)
    sigma = torch.full((1,), 0.5, device=device)
    denoise = gaussian_cuda.map_cuda(DENOISE)
    points = torch.randn(256, d, device=device, generator=gen)
    center = points.mean(0)
    K, r = 8, 16
    log_w = torch.randn(K, device=device, generator=gen)
    means = torch.randn(K, d, device=device, generator=gen)
    bases = torch.linalg.qr(torch.randn(K, d, r, device=device, generator=gen))[0].contiguous()
    eig = torch.rand(K, r, device=device, generator=gen)
    lam_perp = torch.full((K,), 0.01, device=device)
    gmm_center = means.mean(0)
    return {
        "denoise": lambda: denoise(x, *params.args, sigma),
        "delta_mixture_forward": lambda: mixture_cuda.delta_mixture_forward_cuda(x, points, None, sigma, center),
        "gmm_forward": lambda: mixture_cuda.gmm_forward_cuda(x, log_w, means, bases, eig, lam_perp, sigma,
                                                             gmm_center),
    }


# The project's host-time targets per call at B = 1 with the launch stubbed (Python and dispatch, CPU
# tensors): what the GPU path adds to a call besides its kernel launches.
HOST_TARGET_S = {"denoise": 15e-6, "delta_mixture_forward": 25e-6, "gmm_forward": 25e-6}


class TorchOpRecorder(TorchDispatchMode):
    """The PyTorch ops (by name) a piece of code issues and how many of them allocate (return a tensor
    whose storage none of their inputs has): on a GPU each op is a kernel launch or an allocator call."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.allocations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        held = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.allocations += sum(1 for t in tree_leaves(out)
                                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held)
        return out


def host_counts(fn) -> dict:
    """One call of fn (caches already warm): the PyTorch ops it issues, how many allocate, and how many
    Python functions it calls -- host work that, unlike its microseconds, does not depend on the load of
    the machine."""
    with TorchOpRecorder() as rec:
        fn()
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    previous = sys.getprofile()
    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return {"torch_ops": rec.ops, "allocations": rec.allocations, "python_calls": calls - 1}  # less fn itself


def run(opts: RunOptions, ops=OPS) -> list[dict]:
    from gsa_kernels import GaussianModel, config
    from gsa_kernels.gaussian import reference

    device = opts.device
    d = DIM[opts.shape_set]
    calls = 20 if opts.shape_set == "tiny" else 200
    params = GaussianParams(d, d, device, opts.seed)
    model = GaussianModel(*params.args)
    x = params.mean + torch.randn(1, d, device=device, generator=params.gen)
    sigma = opts.sigma
    sigma_t = torch.full((1,), sigma, device=device)
    variants = [
        ("api, validation on", "gsa", True, lambda: model.denoise(x, sigma_t)),
        ("api, validation off", "gsa", False, lambda: model.denoise(x, sigma_t)),
        ("api, float sigma", "gsa", False, lambda: model.denoise(x, sigma)),
        ("torch.ops.gsa", "gsa", False, lambda: torch.ops.gsa.gaussian_denoise(x, *params.args, sigma_t)),
        ("eager reference", "eager", False, lambda: reference.gaussian_denoise(x, *params.args, sigma_t)),
    ]
    rows = []
    was_validating = config.validation_enabled()
    try:
        for name, kind, validate, fn in variants:
            config.set_validation(validate)
            host, latency = _host_and_latency(fn, device, calls)
            rows.append(_row(d, name, kind, host_s=host, median_s=latency))
    finally:
        config.set_validation(was_validating)
    if device.type == "cuda":
        rows.append(_graph_row(d, params, x, sigma_t, calls, opts.min_time))
    else:
        with stubbed_triton_launch():
            for op, fn in stubbed_cuda_calls(d, device, opts.seed).items():
                host, latency = _host_and_latency(fn, device, calls)
                counts = host_counts(fn)
                note = (f"{len(counts['torch_ops'])} PyTorch ops ({counts['allocations']} allocating), "
                        f"{counts['python_calls']} Python calls per call; target <= {HOST_TARGET_S[op] * 1e6:.0f} us")
                rows.append(_row(d, "cuda kernel, launch stubbed", "gsa", op=op, config_str=f"{op}, d={d}",
                                 host_s=host, median_s=latency, note=note))
        rows.append(_row(d, "cuda graph replay", "gsa", status="skipped", reason="CUDA graphs need a GPU"))
    return rows


def _graph_row(d, params, x, sigma_t, calls, min_time) -> dict:
    """Capture one torch.ops.gsa.gaussian_denoise call in a CUDA graph and time its replays."""
    def call():
        return torch.ops.gsa.gaussian_denoise(x, *params.args, sigma_t)

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        graph.replay()
        torch.cuda.synchronize()
        max_diff = float((out - call()).abs().max())
        host, _ = _host_and_latency(graph.replay, torch.device("cuda"), calls)
        device_time = time_call(graph.replay, torch.device("cuda"), min_time).median_s
    except Exception as exc:
        torch.cuda.synchronize()
        return _row(d, "cuda graph replay", "gsa", status="error",
                    reason=f"not capturable: {type(exc).__name__}: {exc}"[:300])
    return _row(d, "cuda graph replay", "gsa", host_s=host, graph_s=device_time,
                note=f"replay matches eager call: max |diff| = {max_diff:.2e}")
