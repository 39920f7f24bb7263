"""Shared machinery of the microbenchmark suite: devices, timing, ceilings, memory, errors and result files.

Every op family (bench_gaussian, bench_mixture) describes its work as `Case`s: one op at one shape, with
the FLOPs and minimal bytes it must move, a float64 reference, and the `Backend`s to time (the package's
op, the eager PyTorch reference, torch.compile of it, the papers'-reference-code style, the bare matmuls).
`run_case` measures every backend the same way and returns one result row (a dict) per backend.

Timing: CUDA -> triton.testing.do_bench (CUDA events, L2 flushed between calls; plain CUDA events if
Triton is missing); CPU -> torch.utils.benchmark. Inputs rotate through buffers that together exceed
the last-level cache, so a call does not find its input already cached by the previous one.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BACKEND_KINDS = ("gsa", "eager", "compile", "papers", "matmuls")
PRECISIONS = ("ieee", "tf32x3", "tf32")

# Shape sets: "full" is the GPU set, "quick" a CPU set that runs in a few minutes on 2 cores,
# "tiny" the smoke-test set (seconds).
SHAPE_SETS = ("tiny", "quick", "full")


# ----------------------------------------------------------------------------------------------------
# Device and environment
def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {name!r}")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{_cpu_model()}, {n} thread{'' if n == 1 else 's'}"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-2t'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {_cpu_model()} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    import gsa_kernels

    now = datetime.datetime.now(datetime.timezone.utc)
    env = {
        "date": now.strftime("%Y-%m-%d"),
        "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_label(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "gsa_kernels": gsa_kernels.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_bytes=props.total_memory, gpu_sm_count=props.multi_processor_count,
                   gpu_l2_bytes=getattr(props, "L2_cache_size", None))
    return env


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or 50 * 2**20
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            sizes.append(int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])
    return max(sizes) if sizes else 32 * 2**20


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


# ----------------------------------------------------------------------------------------------------
# Matrix precision of torch's own float32 matmuls (the eager/compile/papers/matmuls baselines).
@contextlib.contextmanager
def torch_matmul_precision(precision: str):
    """'ieee' (TF32 off) or 'tf32' for torch.matmul on CUDA; CPU matmuls are always IEEE float32."""
    if not torch.cuda.is_available() or (precision != "tf32" and not _tf32_enabled()):
        yield  # nothing to change (touching the flags at all would risk mixing torch's two TF32 APIs)
        return
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):
        old = mm.fp32_precision
        mm.fp32_precision = "tf32" if precision == "tf32" else "ieee"
        try:
            yield
        finally:
            mm.fp32_precision = old
    else:  # older torch
        old = mm.allow_tf32
        mm.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            mm.allow_tf32 = old


def _tf32_enabled() -> bool:
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision") and mm.fp32_precision != "none":
        return mm.fp32_precision == "tf32"
    return bool(mm.allow_tf32)


def ceiling_key(precision: str) -> str:
    """Which measured matmul ceiling a row is compared with: TF32 for 'tf32', IEEE float32 otherwise
    (3xTF32 delivers float32 accuracy, so the float32 matmul is its like-for-like ceiling)."""
    return "tf32" if precision == "tf32" else "ieee"


# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# Peak extra memory of one call
class _ProcessMemory:
    """CPU peak-memory accounting without a caching allocator: free heap pages are returned to the OS
    (malloc_trim), the kernel's RSS high-water mark is reset (/proc/self/clear_refs, '5'), and after the
    call VmHWM - VmRSS(before) is the peak of the memory the call touched (output included)."""

    def __init__(self):
        self.reason = None
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.malloc_trim(0)
            self._reset_hwm()
            self._read()
        except (OSError, AttributeError, ValueError) as exc:
            self.reason = f"CPU memory accounting unavailable ({type(exc).__name__}: {exc})"

    @staticmethod
    def _reset_hwm():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _read():
        with open("/proc/self/status") as f:
            text = f.read()

        def kb(key):
            return int(re.search(key + r":\s+(\d+) kB", text).group(1)) * 1024

        return kb("VmRSS"), kb("VmHWM")

    def peak_extra(self, fn):
        self._libc.malloc_trim(0)
        self._reset_hwm()
        rss_before, _ = self._read()
        out = fn()
        _, hwm = self._read()
        del out
        return max(0, hwm - rss_before)


_process_memory = None


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str | None]:
    """Peak memory allocated during one call beyond what was allocated before it (output included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak), None
    global _process_memory
    if _process_memory is None:
        _process_memory = _ProcessMemory()
    if _process_memory.reason:
        return None, _process_memory.reason
    return _process_memory.peak_extra(fn), None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.reshape(ref.shape).double()
    ref = ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ----------------------------------------------------------------------------------------------------
# Cases and backends
@dataclass
class Backend:
    name: str                                   # row label: "gsa", "gsa[tf32]", "eager", "matmuls[tf32]", ...
    kind: str                                   # one of BACKEND_KINDS (speedups are taken between kinds)
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    precision: str = "ieee"
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    compares_output: bool = True               # False for the bare matmuls (no comparable output)
    temp_bytes: int = 0                         # estimated temporaries, to skip what cannot fit
    skip: str | None = None
    graph: bool = False                         # also time CUDA-graph replays (device time only)


@dataclass
class Case:
    family: str
    op: str
    config: dict                                # non-batch shape parameters, e.g. {"d": 3072, "r": 3072}
    batch: int
    flops: float
    min_bytes: float                            # each input byte read once + output written once
    in_bytes: int
    out_bytes: int
    make_x: Callable[[], torch.Tensor]
    reference64: Callable[[torch.Tensor], torch.Tensor]   # float64 reference on the given rows
    err_rows: int
    backends: list[Backend] = field(default_factory=list)

    @property
    def config_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.config.items())


@dataclass
class RunOptions:
    device: torch.device
    shape_set: str
    min_time: float
    backends: tuple = BACKEND_KINDS
    precisions: tuple = ("ieee",)
    batches: tuple | None = None
    sigma: float = 1.0
    sigma_from: float = 80.0
    compile_budget_s: float = 300.0
    seed: int = 0
    compile_spent_s: float = 0.0

    def wants(self, kind: str) -> bool:
        return kind in self.backends


def _format_bytes(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def standard_backends(opts: RunOptions, *, gsa, eager, papers, matmuls, temp_bytes: dict,
                      gsa_skip: str | None = None, papers_skip: str | None = None) -> list[Backend]:
    """The selected backends of one case, built the same way for every op family.

    gsa: the package op (one row per precision mode on CUDA); eager: the float32 PyTorch reference;
    compile: torch.compile of it; papers: the papers'-reference-code-style implementation; matmuls: the
    bare matmuls the op needs. temp_bytes: estimated temporaries per kind (to skip what cannot fit).
    The torch baselines run with TF32 off ('ieee'); only the matmuls also get a TF32 row.
    """
    device = opts.device
    out = []
    if opts.wants("gsa"):
        for p in precision_variants(opts, device):
            out.append(Backend(backend_label("gsa", p), "gsa", fn=gsa, precision=p, context=gsa_context(p),
                               temp_bytes=temp_bytes.get("gsa", 0), skip=gsa_skip, graph=True))
    if opts.wants("eager"):
        out.append(Backend("eager", "eager", fn=eager, context=torch_context("ieee"),
                           temp_bytes=temp_bytes.get("eager", 0)))
    if opts.wants("compile"):
        # torch.compile of the eager reference (default mode, static shapes: the best a user gets without
        # tuning), compiled lazily at the first call so that its compile time is budgeted and reported.
        skip = "--no-compile" if opts.compile_budget_s <= 0 else None
        out.append(Backend("compile", "compile", fn=_LazyCompile(eager), context=torch_context("ieee"),
                           temp_bytes=temp_bytes.get("eager", 0), skip=skip))
    if opts.wants("papers"):
        out.append(Backend("papers", "papers", fn=papers, context=torch_context("ieee"),
                           temp_bytes=temp_bytes.get("papers", 0), skip=papers_skip))
    if opts.wants("matmuls"):
        kinds = ["ieee"]
        if device.type == "cuda" and any(p in opts.precisions for p in ("tf32", "tf32x3")):
            kinds.append("tf32")
        for p in kinds:
            out.append(Backend(backend_label("matmuls", p), "matmuls", fn=matmuls, precision=p,
                               context=torch_context(p), compares_output=False,
                               temp_bytes=temp_bytes.get("matmuls", 0)))
    return out


class _LazyCompile:
    def __init__(self, fn):
        self.eager = fn
        self.fn = None

    def __call__(self, x):
        if self.fn is None:
            torch._dynamo.reset()  # fresh caches: no recompile limit carried over from other cases
            self.fn = torch.compile(self.eager, dynamic=False)
        return self.fn(x)


def run_case(case: Case, opts: RunOptions, ceilings: dict) -> list[dict]:
    device = opts.device
    if device.type == "cuda":
        gc.collect()  # drop the previous case's tensors before reading free memory (slow: once per case)
        torch.cuda.empty_cache()
    cap = (1 << 30) if device.type == "cuda" else (128 << 20)
    xs = rotating_buffers(case.make_x, device, cap)
    try:
        ref, ref_note = case.reference64(xs[0][: case.err_rows]), None
    except Exception as exc:  # the timings are still worth having without the error column
        ref, ref_note = None, f"float64 reference failed: {type(exc).__name__}: {exc}"[:200]
    free = free_memory_bytes(device)
    rows = []
    for be in case.backends:
        row = _base_row(case, be, len(xs))
        row["err_note"] = ref_note
        rows.append(row)
        if be.skip:
            row.update(status="skipped", reason=be.skip)
            continue
        if be.temp_bytes > 0.8 * free:
            row.update(status="skipped", reason=f"needs ~{_format_bytes(be.temp_bytes)}, {_format_bytes(free)} free")
            continue
        if be.kind == "compile" and opts.compile_spent_s >= opts.compile_budget_s:
            row.update(status="skipped", reason=f"compile budget ({opts.compile_budget_s:.0f} s) spent")
            continue
        try:
            with be.context():
                _measure(row, be, case, xs, ref, opts)
        except torch.OutOfMemoryError:
            row.update(status="skipped", reason="out of memory")
        except Exception as exc:
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if row["status"] == "ok":
            derive(row, ceilings)
    _speedups(rows)
    return rows


def _base_row(case: Case, be: Backend, n_buffers: int) -> dict:
    return {
        "family": case.family, "op": case.op, "config": dict(case.config), "config_str": case.config_str,
        "batch": case.batch, "backend": be.name, "kind": be.kind, "precision": be.precision,
        "status": "ok", "reason": None,
        "median_s": None, "iqr_s": None, "runs": None, "timer": None, "first_call_s": None, "compile_s": None,
        "graph_s": None, "graph_note": None,
        "flops": case.flops, "min_bytes": case.min_bytes, "in_bytes": case.in_bytes, "out_bytes": case.out_bytes,
        "tflops": None, "gbps": None, "pct_bw": None, "pct_flops": None, "roofline_pct": None,
        "peak_extra_bytes": None, "mem_vs_io": None, "mem_note": None,
        "rel_err": None, "err_rows": case.err_rows, "rotating_buffers": n_buffers,
        "speedup_vs_eager": None, "speedup_vs_compile": None, "speedup_vs_papers": None, "vs_matmuls": None,
    }


def _measure(row, be, case, xs, ref, opts):
    device = opts.device
    start = time.perf_counter()
    out = be.fn(xs[0])
    sync(device)
    row["first_call_s"] = time.perf_counter() - start
    if be.kind == "compile":
        row["compile_s"] = row["first_call_s"]
        opts.compile_spent_s += row["first_call_s"]
    if be.compares_output and ref is not None:
        row["rel_err"] = rel_err(out[: case.err_rows], ref)
    del out
    peak, note = peak_extra_bytes(lambda: be.fn(xs[0]), device)
    row["peak_extra_bytes"], row["mem_note"] = peak, note
    if peak is not None:
        # The memory target: (inputs + peak extra) / (inputs + outputs).
        row["mem_vs_io"] = (case.in_bytes + peak) / (case.in_bytes + case.out_bytes)
    timing = time_call(cycling(be.fn, xs), device, opts.min_time)
    row.update(median_s=timing.median_s, iqr_s=timing.iqr_s, runs=timing.runs, timer=timing.method)
    if be.graph and device.type == "cuda":
        row["graph_s"], row["graph_note"] = time_cuda_graph(be.fn, xs, opts.min_time)


def derive(row, ceilings) -> None:
    """Throughput and percent-of-ceiling columns of a timed row."""
    t = row["median_s"]
    row["tflops"] = row["flops"] / t / 1e12
    row["gbps"] = row["min_bytes"] / t / 1e9
    bw = ceilings["copy"]["gbps"]
    peak = ceilings["matmul"].get(ceiling_key(row["precision"]), ceilings["matmul"]["ieee"])["tflops"]
    row["pct_bw"] = 100 * row["gbps"] / bw
    row["pct_flops"] = 100 * row["tflops"] / peak
    # Roofline: the time the measured ceilings allow for this much traffic and arithmetic.
    bound = max(row["min_bytes"] / (bw * 1e9), row["flops"] / (peak * 1e12))
    row["roofline_pct"] = 100 * bound / t


def recompute_speedups(rows) -> None:
    """Speedups of rows grouped by case (after merging rows of several runs)."""
    groups = {}
    for r in rows:
        if r["family"] != "overhead":
            groups.setdefault((r["family"], r["op"], r["config_str"], r["batch"]), []).append(r)
    for group in groups.values():
        _speedups(group)


def _speedups(rows):
    def time_of(kind, precision=None):
        for r in rows:
            if r["kind"] == kind and r["status"] == "ok" and (precision is None or r["precision"] == precision):
                return r["median_s"]
        return None

    for r in rows:
        if r["status"] != "ok":
            continue
        for kind in ("eager", "compile", "papers"):
            base = time_of(kind)
            r[f"speedup_vs_{kind}"] = base / r["median_s"] if base else None
        if r["kind"] == "gsa":
            mm = time_of("matmuls", "tf32" if r["precision"] in ("tf32", "tf32x3") else "ieee")
            mm = mm or time_of("matmuls", "ieee")
            r["vs_matmuls"] = r["median_s"] / mm if mm else None


def precision_variants(opts: RunOptions, device: torch.device, kinds=PRECISIONS):
    """The gsa precision modes to run: all selected ones on CUDA; only 'ieee' on CPU (the CPU kernels
    have no TF32 mode)."""
    if device.type != "cuda":
        return ["ieee"]
    return [p for p in kinds if p in opts.precisions]


def gsa_context(precision: str):
    from gsa_kernels import config

    return lambda: config.precision(precision)


def torch_context(precision: str):
    return lambda: torch_matmul_precision(precision)


def backend_label(kind: str, precision: str) -> str:
    return kind if precision == "ieee" else f"{kind}[{precision}]"


# ----------------------------------------------------------------------------------------------------
# Output: printed table, JSON, markdown, plot
def fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt(v, spec, suffix=""):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _fmt_mem(v):
    return "-" if v is None else f"{v / 2**20:.2f}"


TABLE_COLUMNS = [
    ("op", lambda r: r["op"]),
    ("shape", lambda r: r["config_str"]),
    ("B", lambda r: str(r["batch"])),
    ("backend", lambda r: r["backend"]),
    ("median", lambda r: fmt_time(r["median_s"])),
    ("TFLOP/s", lambda r: _fmt(r["tflops"], ".3f")),
    ("GB/s", lambda r: _fmt(r["gbps"], ".1f")),
    ("%BW", lambda r: _fmt(r["pct_bw"], ".0f")),
    ("%FLOP", lambda r: _fmt(r["pct_flops"], ".0f")),
    ("%roof", lambda r: _fmt(r["roofline_pct"], ".0f")),
    ("extra MiB", lambda r: _fmt_mem(r["peak_extra_bytes"])),
    ("mem/io", lambda r: _fmt(r["mem_vs_io"], ".2f")),
    ("rel err", lambda r: _fmt(r["rel_err"], ".1e")),
    ("x eager", lambda r: _fmt(r["speedup_vs_eager"], ".2f")),
    ("x compile", lambda r: _fmt(r["speedup_vs_compile"], ".2f")),
    ("x papers", lambda r: _fmt(r["speedup_vs_papers"], ".2f")),
    ("/matmuls", lambda r: _fmt(r["vs_matmuls"], ".2f")),
    ("graph", lambda r: fmt_time(r["graph_s"])),
]


def _cells(row):
    if row["status"] != "ok":
        head = [fn(row) for _, fn in TABLE_COLUMNS[:4]]
        return head + [f"{row['status']}: {row['reason']}"] + [""] * (len(TABLE_COLUMNS) - 5)
    return [fn(row) for _, fn in TABLE_COLUMNS]


def print_rows(rows, header=False):
    widths = [10, 16, 5, 14, 10, 8, 8, 5, 5, 5, 9, 6, 8, 7, 9, 8, 8, 9]
    if header:
        print("  ".join(name.ljust(w) for (name, _), w in zip(TABLE_COLUMNS, widths)), flush=True)
    for r in rows:
        cells = _cells(r)
        if r["status"] != "ok":
            print("  ".join(c.ljust(w) for c, w in zip(cells[:4], widths)) + "  " + cells[4], flush=True)
        else:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)), flush=True)


def result_stem(env: dict, tag: str | None = None) -> str:
    stem = f"{env['device_slug']}_{env['date']}"
    return f"{stem}_{tag}" if tag else stem


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def markdown(payload: dict) -> str:
    env, ceil, rows = payload["env"], payload["ceilings"], payload["rows"]
    lines = [
        f"# gsa_kernels microbenchmarks: {env['device']}, {env['date']}",
        "",
    ]
    if env["device_type"] == "cpu":
        lines += ["**CPU numbers** (small `--shapes " + payload["options"]["shape_set"] + "` set). "
                  "No GPU results yet; nothing here is a GPU figure.", ""]
    lines += [
        "| | |", "|---|---|",
        f"| device | {env['device']} |",
        f"| date (UTC) | {env['time_utc']} |",
        f"| torch / triton | {env['torch']} / {env['triton']} |",
        f"| gsa_kernels | {env['gsa_kernels']} (commit {env['git_commit']}) |",
        f"| load average at start (1, 5, 15 min) | {', '.join(f'{v:.2f}' for v in env['load_average'] or [])} |",
        f"| command | `{payload['command']}` |",
        f"| wall time | {payload['wall_s']:.0f} s |",
        "",
        "## Ceilings measured in this run",
        "",
        f"- copy bandwidth (device-to-device copy of {ceil['copy']['bytes'] / 2**20:.0f} MiB, read + write): "
        f"**{ceil['copy']['gbps']:.1f} GB/s**",
    ]
    for kind, m in ceil["matmul"].items():
        mode = "TF32" if kind == "tf32" else "IEEE"
        lines.append(f"- float32 matmul {m['n']}^3 ({mode}): **{m['tflops']:.3f} TFLOP/s**")
    lines.append("")
    families = list(dict.fromkeys(r["family"] for r in rows))
    names = [name for name, _ in TABLE_COLUMNS]
    for fam in families:
        if fam == "overhead":
            from .bench_overhead import markdown_table

            lines += ["## overhead", ""] + markdown_table([r for r in rows if r["family"] == fam]) + [""]
            continue
        lines += [f"## {fam}", "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        for r in (r for r in rows if r["family"] == fam):
            lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |")
        lines.append("")
    for note in payload.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "Columns: " + COLUMN_NOTES, ""]
    return "\n".join(lines)


COLUMN_NOTES = (
    "median = median time per call; TFLOP/s and GB/s from the op's FLOPs and minimal bytes (each input byte "
    "read once, output written once); %BW / %FLOP = percent of the copy bandwidth / matmul throughput measured "
    "in this run (TF32 ceiling for tf32 rows); %roof = the roofline time max(bytes/BW, FLOPs/peak) over the "
    "median; extra MiB = peak memory allocated during one call beyond what was allocated before it, output "
    "included; mem/io = (inputs + extra) / (inputs + outputs); rel err = ||out - ref|| / ||ref|| against the "
    "float64 reference on the first rows; x eager / x compile / x papers = that backend's time over this row's "
    "(higher: this row faster); /matmuls = this row's time over the bare matmuls the op needs (same precision; "
    "TF32 for tf32x3); graph = device time per call replayed in a CUDA graph (GPU only)."
)


def plot(payload: dict, path: Path) -> bool:
    """Time against batch size, one panel per op and non-batch shape, one line per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in payload["rows"] if r["status"] == "ok" and r["family"] != "overhead"]
    panels = list(dict.fromkeys((r["family"], r["op"], r["config_str"]) for r in rows))
    if not panels:
        return False
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    for ax, (fam, op, cfg) in zip(axes.flat, panels):
        sub = [r for r in rows if (r["family"], r["op"], r["config_str"]) == (fam, op, cfg)]
        for name in dict.fromkeys(r["backend"] for r in sub):
            pts = sorted((r["batch"], r["median_s"]) for r in sub if r["backend"] == name)
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=name,
                    linestyle="--" if name.startswith(("matmuls", "papers")) else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op}  {cfg}", fontsize=9)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    env = payload["env"]
    fig.suptitle(f"gsa_kernels microbenchmarks: {env['device']}, {env['date']} (torch {env['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=75)
    plt.close(fig)
    return True
