"""Peak extra memory of one call: the CUDA caching allocator's peak on a GPU, the process's RSS high-water
mark on a CPU."""
from __future__ import annotations

import ctypes
import re
from typing import Callable

import torch

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


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
