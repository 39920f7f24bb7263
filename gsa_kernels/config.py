"""Package-wide settings read at call time (not traced into graphs)."""
from __future__ import annotations

import contextlib

# Matrix-unit precision of the GPU kernels for float32 data:
#   "ieee"   - exact float32 products (default; meets the 1e-5 / 1e-4 accuracy contract),
#   "tf32x3" - split TF32 products (3 MMAs), float32-level accuracy at tensor-core speed,
#   "tf32"   - one TF32 MMA, about 3e-4 relative error per product.
_PRECISIONS = ("ieee", "tf32x3", "tf32")
_state = {"precision": "ieee", "validate": True}


def set_precision(precision: str) -> None:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    _state["precision"] = precision


def get_precision() -> str:
    return _state["precision"]


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
