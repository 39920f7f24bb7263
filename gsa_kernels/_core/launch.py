"""Launch configuration shared by the Triton launchers: grid arithmetic, the CUDA device guard, and
occupancy (resident CTAs per SM from a compiled kernel's registers, shared memory and warps; split
counts that fill whole waves).
"""
from __future__ import annotations

import contextlib
import functools

import torch

# A CUDA grid's y and z dimensions hold at most this many programs (x: 2^31 - 1).
MAX_GRID_YZ = 65535
# Per-SM limits of the sm_80 / sm_89 / sm_90 GPUs, used when the device does not report them.
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (plain Python: triton.cdiv is a JIT function with a slow host call path)."""
    return -(-a // b)


class LaunchPlans(dict):
    """Launch plans (grids, split counts, constexprs) of one launcher keyed on everything they depend on
    (shapes, dtypes, flags, precision, device): a repeated call looks its plan up instead of recomputing
    it. One entry per distinct call signature, cleared past max_entries (a stream of new shapes cannot
    grow it without bound)."""

    def __init__(self, max_entries: int = 1024):
        super().__init__()
        self.max_entries = max_entries

    def remember(self, key, plan):
        if len(self) >= self.max_entries:
            self.clear()
        self[key] = plan
        return plan


_NO_GUARD = contextlib.nullcontext()  # reusable: entering it does nothing


def device_guard(t: torch.Tensor):
    """Make t's CUDA device current for the launches (a kernel launched on the current device could not
    read tensors on another one); a shared no-op for other devices and when it already is current (the
    common case, which then costs no device switch and back). (t.is_cuda and t.get_device(): a tenth of
    the host time of t.device.type.)"""
    if not t.is_cuda:
        return _NO_GUARD
    index = t.get_device()
    if index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(index)


@functools.lru_cache(maxsize=None)
def device_limits(device: torch.device) -> dict:
    """SM count and per-SM register file, shared memory and thread limits of a CUDA device."""
    p = torch.cuda.get_device_properties(device)
    return {"sm_count": p.multi_processor_count,
            "regs_per_sm": getattr(p, "regs_per_multiprocessor", None) or REGS_PER_SM,
            "shared_per_sm": getattr(p, "shared_memory_per_multiprocessor", None) or 0,
            "threads_per_sm": getattr(p, "max_threads_per_multi_processor", None) or THREADS_PER_SM}


def ctas_per_sm(n_regs: int, num_warps: int, shared_bytes: int, *, regs_per_sm: int = REGS_PER_SM,
                shared_per_sm: int = 0, threads_per_sm: int = THREADS_PER_SM) -> int:
    """Resident CTAs of one kernel per SM: the least of the register, shared-memory, thread and CTA limits
    (registers are allocated per warp in units of 256)."""
    regs_per_warp = cdiv(max(n_regs, 1) * 32, REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = [regs_per_sm // (regs_per_warp * num_warps), threads_per_sm // (32 * num_warps), CTAS_PER_SM]
    if shared_bytes and shared_per_sm:
        limits.append(shared_per_sm // shared_bytes)
    return max(1, min(limits))


def wave_splits(row_blocks: int, slots: int, max_splits: int, cap: int) -> int:
    """Programs along the split axis: the most that keep row_blocks x splits within one wave of `slots`
    resident CTAs (SMs x CTAs per SM), within max_splits (work items along the axis) and cap (the
    workspace bound). A split-K grid gains nothing from a second wave but a partial tail wave and more
    merge work; one split when the row tiles alone fill a wave."""
    return max(1, min(slots // max(row_blocks, 1), max_splits, cap))


def compiled_resources(compiled) -> tuple[int, int, int, int]:
    """(n_regs, n_spills, shared bytes, num_warps) of a compiled Triton kernel, loading its binary when the
    register count is not known yet (it is read from the loaded module)."""
    if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
        compiled._init_handles()
    meta = compiled.metadata
    shared = meta.get("shared") if isinstance(meta, dict) else getattr(meta, "shared", 0)
    warps = meta.get("num_warps") if isinstance(meta, dict) else getattr(meta, "num_warps", 4)
    return int(compiled.n_regs or 0), int(getattr(compiled, "n_spills", 0) or 0), int(shared or 0), int(warps)


_OCCUPANCY: dict = {}


def kernel_slots(kernel, device: torch.device, config_key, warm) -> int:
    """SMs x resident CTAs per SM of `kernel` at one launch configuration on a CUDA device, from the
    compiled kernel: on first use of the configuration, warm() gives the (args, kwargs) of a launch and
    the kernel is compiled (not launched) with them; the count is cached."""
    key = (kernel, device, config_key)
    slots = _OCCUPANCY.get(key)
    if slots is None:
        limits = device_limits(device)
        args, kwargs = warm()
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        n_regs, _, shared, warps = compiled_resources(compiled)
        per_sm = ctas_per_sm(n_regs, warps, shared, regs_per_sm=limits["regs_per_sm"],
                             shared_per_sm=limits["shared_per_sm"], threads_per_sm=limits["threads_per_sm"])
        slots = _OCCUPANCY[key] = limits["sm_count"] * per_sm
    return slots


def split_count(kernel, device: torch.device, row_blocks: int, max_splits: int, workspace_rows: int,
                config_key, warm, workspace_elements: int) -> int:
    """Programs along a split-K axis: one wave of the kernel's resident CTAs on a CUDA device (see
    wave_splits), each split's [workspace_rows] elements within workspace_elements in all; 1 elsewhere
    (a deterministic fallback: the interpreter has no device to fill)."""
    if device.type != "cuda":
        return 1
    cap = max(1, workspace_elements // max(workspace_rows, 1))
    return wave_splits(row_blocks, kernel_slots(kernel, device, config_key, warm), max_splits, cap)
