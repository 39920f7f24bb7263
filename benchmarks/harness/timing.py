"""Timing: CUDA -> triton.testing.do_bench (CUDA events, L2 flushed between calls; plain CUDA events if
Triton is missing); CPU -> torch.utils.benchmark. Inputs rotate through buffers that together exceed the
last-level cache, so a call does not find its input already cached by the previous one. The copy and
matmul ceilings of a run are measured here too."""
from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .environment import last_level_cache_bytes, torch_matmul_precision

PRECISIONS = ("ieee", "tf32x3", "tf32")

def ceiling_key(precision: str) -> str:
    """Which measured matmul ceiling a row is compared with: TF32 for 'tf32', IEEE float32 otherwise
    (3xTF32 delivers float32 accuracy, so the float32 matmul is its like-for-like ceiling)."""
    return "tf32" if precision == "tf32" else "ieee"


# Timing
@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int
    method: str
    min_s: float


def _quartiles(times):
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], statistics.median(times), q[2]


def time_call(fn: Callable[[], object], device: torch.device, min_time: float) -> Timing:
    """Median time of fn() after warm-up; about min_time seconds of measurement."""
    if device.type == "cuda":
        return _time_cuda(fn, min_time)
    return _time_cpu(fn, min_time)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time_cpu(fn, min_time):
    from torch.utils import benchmark

    first = _timed(fn)  # warm-up: lazy initialisation, thread pool, page faults of the first allocation
    if first >= min_time:
        # Slow call (a dense d x d solve, say): two more plain repetitions say enough.
        times = [_timed(fn), _timed(fn)]
        q1, med, q3 = _quartiles(times)
        return Timing(med, q3 - q1, len(times), "perf_counter", min(times))
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_time)
    return Timing(m.median, m.iqr, m.number_per_run * len(m.times), "torch.utils.benchmark", min(m.times))


def time_cpu_in_turns(calls: list, min_time: float, rounds: int = 5) -> list:
    """CPU timings of several backends of one case, measured in turns: `rounds` rounds, each timing every
    backend for min_time / rounds. A change of the machine's load during the case (other processes on a
    shared host) then weighs on every backend alike, so the ratios between them (x eager, /matmuls) hold
    even when the absolute times drift. calls: (fn, context) pairs; each is warm already."""
    from torch.utils import benchmark

    times = [[] for _ in calls]
    for _ in range(rounds):
        for i, (fn, context) in enumerate(calls):
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            with context():
                m = timer.blocked_autorange(min_run_time=min_time / rounds)
            times[i].append((m.median, m.number_per_run * len(m.times), min(m.times)))
    out = []
    for per_round in times:
        medians = [t[0] for t in per_round]
        q1, med, q3 = _quartiles(medians)
        out.append(Timing(med, q3 - q1, sum(t[1] for t in per_round), f"in turns ({rounds} rounds)",
                          min(t[2] for t in per_round)))
    return out


def _time_cuda(fn, min_time):
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        times_ms = do_bench(fn, warmup=25, rep=max(1, int(min_time * 1000)), return_mode="all")
        times = [t * 1e-3 for t in times_ms]
        q1, med, q3 = _quartiles(times)
        return Timing(med, q3 - q1, len(times), "triton.testing.do_bench", min(times))
    # Fallback: CUDA events per call, L2 flushed by writing a buffer larger than it in between.
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + min_time
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    q1, med, q3 = _quartiles(times)
    return Timing(med, q3 - q1, len(times), "cuda events", min(times))


def time_cuda_graph(call: Callable, xs: list, min_time: float) -> tuple[float | None, str | None]:
    """Device time per call when the calls over all rotating buffers are replayed as one CUDA graph
    (no host overhead). Returns (seconds per call, None) or (None, why it could not be captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
            for x in xs[:2]:
                call(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [call(x) for x in xs]
        timing = _time_cuda(graph.replay, min_time)
        del outs, graph
        return timing.median_s / len(xs), None
    except Exception as exc:  # capture failures are a result, not a crash
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {exc}"[:200]


def rotating_buffers(make_x: Callable[[], torch.Tensor], device: torch.device, cap_bytes: int) -> list:
    """Copies of the input that together exceed twice the last-level cache (at most 64 of them, and
    at most cap_bytes in all), so consecutive calls read inputs that are not already cached."""
    x0 = make_x()
    nbytes = x0.numel() * x0.element_size()
    want = math.ceil(2 * last_level_cache_bytes(device) / max(nbytes, 1))
    count = max(1, min(64, want, cap_bytes // max(nbytes, 1)))
    return [x0] + [x0.clone() for _ in range(count - 1)]


def cycling(fn: Callable, xs: list) -> Callable[[], object]:
    order = itertools.cycle(xs)
    return lambda: fn(next(order))


# Ceilings, measured in the same run
def measure_ceilings(device: torch.device, shape_set: str, min_time: float, precisions=PRECISIONS) -> dict:
    """Copy bandwidth (a large device-to-device copy; GB/s counts read + write) and float32 matmul
    throughput (a large square matmul; TFLOP/s), IEEE and, on CUDA, TF32. A ceiling is the best time
    observed (not the median): on a shared machine the median measures the neighbours too."""
    copy_bytes = {"tiny": 32, "quick": 256, "full": 1024}[shape_set] * 2**20
    if device.type == "cuda":
        copy_bytes = max(copy_bytes, 1024 * 2**20)
    n_mm = {"tiny": 512, "quick": 2048, "full": 4096}[shape_set] if device.type == "cpu" else 8192
    # At least a few samples even where one call is slower than min_time.
    def best(fn):
        return min(time_call(fn, device, min_time).min_s for _ in range(3 if device.type == "cpu" else 1))

    src = torch.rand(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = best(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(n_mm, n_mm, device=device)
    b = torch.randn(n_mm, n_mm, device=device)
    c = torch.empty(n_mm, n_mm, device=device)
    matmul = {}
    kinds = ["ieee"] + (["tf32"] if device.type == "cuda" and any(p != "ieee" for p in precisions) else [])
    for kind in kinds:
        with torch_matmul_precision(kind):
            t = best(lambda: torch.mm(a, b, out=c))
        matmul[kind] = {"tflops": 2 * n_mm**3 / t / 1e12, "n": n_mm, "best_s": t}
    del a, b, c
    return {
        "copy": {"gbps": 2 * copy_bytes / t_copy / 1e9, "bytes": copy_bytes, "best_s": t_copy},
        "matmul": matmul,
    }


def best_ceilings(*measured: dict) -> dict:
    """The higher of several measurements of each ceiling (taken at the start and the end of a run)."""
    out = {"copy": max((m["copy"] for m in measured), key=lambda c: c["gbps"]), "matmul": {}}
    for kind in measured[0]["matmul"]:
        out["matmul"][kind] = max((m["matmul"][kind] for m in measured), key=lambda c: c["tflops"])
    return out
