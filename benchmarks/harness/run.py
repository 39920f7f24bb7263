"""Cases, backends and the run loop: every op family (benchmarks/cases/) describes its work as `Case`s (one
op at one shape, with the FLOPs and minimal bytes it must move, a float64 reference, and the `Backend`s
to time: the package's op, the eager PyTorch reference, torch.compile of it, the papers'-reference-code
style, the bare matmuls). `run_case` measures every backend the same way and returns one row per backend."""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .environment import free_memory_bytes, sync, torch_matmul_precision
from .memory import peak_extra_bytes
from .timing import (PRECISIONS, ceiling_key, cycling, rotating_buffers, time_call, time_cpu_in_turns,
                     time_cuda_graph)

BACKEND_KINDS = ("gsa", "eager", "compile", "papers", "matmuls")

# Shape sets: "full" is the GPU set of the benchmark targets, "quick" a CPU set that runs in a few minutes on 2 cores,
# "tiny" the smoke-test set (seconds).
SHAPE_SETS = ("tiny", "quick", "full")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.reshape(ref.shape).double()
    ref = ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


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
    in_turns = []  # CPU backends timed together after the loop (see time_cpu_in_turns)
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
                if not _measure(row, be, case, xs, ref, opts):
                    in_turns.append((row, be))
        except torch.OutOfMemoryError:
            row.update(status="skipped", reason="out of memory")
        except Exception as exc:
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if in_turns:
        timings = time_cpu_in_turns([(cycling(be.fn, xs), be.context) for _, be in in_turns], opts.min_time)
        for (row, _), timing in zip(in_turns, timings):
            row.update(median_s=timing.median_s, iqr_s=timing.iqr_s, runs=timing.runs, timer=timing.method)
    for row in rows:
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


def _measure(row, be, case, xs, ref, opts) -> bool:
    """First call, error, peak memory, and the timing unless it is left to the CPU's timing in turns
    (returns whether it was timed here: always on CUDA, and for a warm CPU call slower than min_time)."""
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
    if device.type != "cuda":
        start = time.perf_counter()
        be.fn(xs[0])  # a warm call (the first may have compiled): slow ones are timed alone
        if time.perf_counter() - start < opts.min_time:
            return False
    timing = time_call(cycling(be.fn, xs), device, opts.min_time)
    row.update(median_s=timing.median_s, iqr_s=timing.iqr_s, runs=timing.runs, timer=timing.method)
    if be.graph and device.type == "cuda":
        row["graph_s"], row["graph_note"] = time_cuda_graph(be.fn, xs, opts.min_time)
    return True


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
