"""Package-wide settings read at call time (not traced into graphs)."""
from __future__ import annotations

import contextlib
import functools

import torch

# Matrix-unit precision of the GPU kernels for float32 data (accuracy and speed: docs/precision.md):
#   "auto"   - the default: "tf32x3" on GPUs with tensor cores (compute capability >= 8.0), "ieee" below;
#   "ieee"   - exact float32 products on the FP32 units (FFMA),
#   "tf32x3" - split TF32 products (3 MMAs: hi*hi + hi*lo + lo*hi), float32-level accuracy on tensor cores,
#   "tf32"   - one TF32 MMA, about 3e-4 relative error per product.
# float64 accumulation always runs "ieee".
_PRECISIONS = ("auto", "ieee", "tf32x3", "tf32")
TENSOR_CORE_CAPABILITY = (8, 0)
_state = {"precision": "auto", "validate": True}


def set_precision(precision: str) -> None:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    _state["precision"] = precision


def get_precision() -> str:
    """The setting as given ("auto" unless set); kernel_precision() resolves it for a device."""
    return _state["precision"]


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def default_precision(capability: tuple[int, int] | None) -> str:
    """What "auto" means on a device of this compute capability (None: not a CUDA device)."""
    if capability is not None and tuple(capability) >= TENSOR_CORE_CAPABILITY:
        return "tf32x3"
    return "ieee"


def kernel_precision(device: torch.device) -> str:
    """The input_precision the float32 Triton kernels get on `device`."""
    setting = _state["precision"]
    if setting != "auto":
        return setting
    return default_precision(_capability(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def precision(value: str):
    old = get_precision()
    set_precision(value)
    try:
        yield
    finally:
        set_precision(old)


def set_validation(enabled: bool) -> None:
    """Value checks (finite, positive sigma; non-negative variances) on GPU tensors read device memory and
    synchronise; they are skipped automatically under torch.compile and CUDA-graph capture, and can be
    switched off here for hot loops."""
    _state["validate"] = bool(enabled)


def validation_enabled() -> bool:
    return _state["validate"]
