"""Where a benchmark runs: the device, its caches and free memory, the software versions, and the matrix
precision of torch's own float32 matmuls (the baselines)."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

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
