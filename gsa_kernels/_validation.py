"""Argument checks for the Python API: each error names the argument it is about.

Value checks (finite, >= 0, > 0) read the data. On CPU tensors that is free and the raw ops do it
themselves (in C++); on a GPU it synchronises, so it happens only where it was asked for: at model
construction and load, or with check_values=True, and never while config.validation is off, under
torch.compile or during CUDA-graph capture.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import config
from ._core.dtypes import compute_dtype

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
PARAM_DTYPES = (torch.float32, torch.float64)


def values_readable(t: torch.Tensor, requested: bool = True) -> bool:
    """Whether a value check of t may read its data now: always on CPU (outside torch.compile); on a GPU
    only when `requested` and config.validation is on and no CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return False
    if t.is_cpu:  # (is_cpu / is_cuda: a tenth of the host time of t.device.type)
        return True
    if not requested or not config.validation_enabled():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device and t.device != torch.device(device):  # device: may be a str
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    return t


def check_finite(name: str, t: torch.Tensor, requested: bool = True) -> None:
    if t.numel() and values_readable(t, requested) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite values (NaN or inf)")


def check_nonneg(name: str, t: torch.Tensor, requested: bool = True) -> None:
    """Finite and >= 0, in one reduction: min(t) is NaN, -inf, < 0 or +inf exactly when a value is bad
    (+inf is then caught by the max)."""
    if not t.numel() or not values_readable(t, requested):
        return
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    if lo < 0:
        raise ValueError(f"{name} has negative values; variances must be >= 0")


def owned(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous copy of t (in `dtype` if given) that shares no memory with t: what a model stores."""
    return t.detach().to(dtype=dtype or t.dtype, memory_format=torch.contiguous_format, copy=True)


def orthonormality_tolerance(dtype: torch.dtype, d: int) -> float:
    """Largest |U^T U - I| entry accepted for a basis stored in `dtype` with d rows: rounding an
    orthonormal basis to `dtype` moves each entry of U^T U by at most eps(dtype), and forming U^T U in
    the compute dtype (float32 for float32 and half storage) adds up to d eps(compute). The factor 4
    leaves room for a basis that was itself computed in `dtype` (eigh / QR in float32)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return 4 * torch.finfo(dtype).eps + 4 * d * torch.finfo(compute).eps


def check_orthonormal(name: str, basis: torch.Tensor, requested: bool = True, rows_per_step: int = 1 << 22) -> None:
    """ValueError unless the columns of basis ([d, r] or [K, d, r]) are orthonormal to the tolerance of
    its dtype (orthonormality_tolerance). All-zero columns are accepted: they are padding (a zero column
    is an exact no-op in every Gaussian map). U^T U is formed a slab of components at a time."""
    if not basis.numel() or not values_readable(basis, requested):
        return
    bases = basis.detach().reshape(-1, *basis.shape[-2:])
    d, r = bases.shape[-2:]
    compute = torch.float64 if basis.dtype == torch.float64 else torch.float32
    tol = orthonormality_tolerance(basis.dtype, d)
    step = max(1, rows_per_step // max(d * r, 1))
    worst = 0.0
    for k in range(0, bases.shape[0], step):
        u = bases[k:k + step].to(compute)
        gram = u.mT @ u
        target = torch.diag_embed((u != 0).any(dim=1).to(compute))  # 1 per nonzero column, 0 for padding
        worst = max(worst, float((gram - target).abs().amax()))
    if not worst <= tol:  # also catches NaN
        raise ValueError(f"{name} must have orthonormal columns (U^T U = I): max |U^T U - I| = {worst:.3g} "
                         f"exceeds {tol:.3g} for {basis.dtype} with d = {d}; pass orthonormalize=True to "
                         f"replace them by the orthonormal basis of their span")


def orthonormalize(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the same space as basis ([d, r] or [K, d, r]), each column j as close
    as possible to the direction of column j (QR with a positive diagonal of R, in float64), in basis's
    dtype."""
    q, rr = torch.linalg.qr(basis.detach().to(torch.float64))
    signs = torch.where(rr.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(torch.float64)
    return (q * signs.unsqueeze(-2)).to(basis.dtype)


def check_sigma_meta(name: str, sigma, x: torch.Tensor) -> None:
    """Type, dtype, device and shape of a sigma tensor ([] or [1] or [B]); no data reads."""
    check_tensor(name, sigma, dtypes=FLOAT_DTYPES, device=x.device)
    if sigma.dim() > 1 or (sigma.dim() == 1 and sigma.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"{name} must be a scalar or have shape [B] = [{x.shape[0]}], got {tuple(sigma.shape)}")


def check_sigma_range(name: str, s: float, dtype: torch.dtype) -> None:
    """A number that does not fit the dtype its op computes in (a finite 1e39 for float32) is named here
    rather than failing inside a tensor conversion."""
    limit = torch.finfo(dtype).max
    if math.isfinite(s) and abs(s) > limit:
        raise ValueError(f"{name} = {s:g} is beyond the range of {dtype} (at most {limit:.4g}), the dtype "
                         f"this call computes in")


def _check_sigma_number(name: str, s: float, allow_zero: bool) -> None:
    if not math.isfinite(s):
        raise ValueError(f"{name} must be finite, got {s}")
    if s < 0 or (s == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {s}")


def _check_sigma_values(name: str, sigma: torch.Tensor, allow_zero: bool) -> None:
    lo, hi = (float(v) for v in torch.aminmax(sigma.detach().reshape(-1)))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    if lo < 0 or (lo == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}")


def _number(name: str, sigma):
    if isinstance(sigma, bool):
        raise TypeError(f"{name} must be a number or a tensor, got bool")
    if isinstance(sigma, numbers.Real):
        return float(sigma)
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"{name} must be a number or a tensor, got {type(sigma).__name__}")
    return None


def sigma_arg(name: str, sigma, x, *, dtype=None, like=None, allow_zero: bool = False, check_values: bool = False):
    """A sigma argument of a raw op: a number becomes a [B] tensor on x's device; a tensor passes as it
    is. The op checks tensors itself (C++ on CPU: shape, dtype, device and values; the meta check on
    GPU: all but values), so only what it cannot see is checked here: a number's value where the op
    runs on a GPU, and a GPU tensor's values when check_values asks for it. dtype: the dtype the call
    computes in; None: compute_dtype(x, like), found only when a number needs it."""
    if type(sigma) is torch.Tensor and type(x) is torch.Tensor and not check_values:
        return sigma  # the per-step case: nothing for Python to do
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    s = sigma if type(sigma) is float else _number(name, sigma)
    if s is not None:
        if x.is_cpu and not torch.compiler.is_compiling():
            return _cpu_sigma(name, s, x, dtype, like)
        dtype = dtype or compute_dtype(x, like)
        check_sigma_range(name, s, dtype)
        if not x.is_cpu:
            _check_sigma_number(name, s, allow_zero)
        return torch.full((x.shape[0] if x.dim() else 1,), s, dtype=dtype, device=x.device)
    if check_values and not x.is_cpu and sigma.numel() and values_readable(sigma):
        _check_sigma_values(name, sigma, allow_zero)
    return sigma


# Sigma tensors of numbers on CPU, (value, batch, dtype) -> (tensor, its version when made): a sampler
# passes the same few numbers again and again, and making the tensor is a third of a small call's host
# time. An entry is used only while its version is unchanged, so a tensor written in place by anyone who
# got hold of it (an autograd graph keeps its inputs) is replaced, never reused. CPU only: a GPU tensor
# filled on one stream and read on another would race, and one made during CUDA-graph capture holds no
# values until replay. The op checks the values (C++), so a bad number fails there, cached or not.
_cpu_sigmas: dict = {}
_CPU_SIGMAS_MAX = 64


def _cpu_sigma(name: str, s: float, x: torch.Tensor, dtype, like) -> torch.Tensor:
    # Keyed by what decides the dtype (dtype, or x's and like's dtypes), so a hit does not resolve it.
    key = (s, x.shape[:1], dtype or (x.dtype, getattr(like, "dtype", None)))
    entry = _cpu_sigmas.get(key)
    if entry is not None and entry[0]._version == entry[1]:
        return entry[0]
    dtype = dtype or compute_dtype(x, like)
    check_sigma_range(name, s, dtype)
    if len(_cpu_sigmas) >= _CPU_SIGMAS_MAX:
        _cpu_sigmas.clear()
    with torch.inference_mode(False):  # a normal tensor (with a version counter) even in inference mode
        t = torch.full(key[1] or (1,), s, dtype=dtype)
    _cpu_sigmas[key] = (t, t._version)
    return t


def as_sigma(name: str, sigma, batch: int, device, *, dtype=torch.float32, allow_zero: bool = False) -> torch.Tensor:
    """A Python number or a [] / [B] tensor -> a [B] tensor on `device`, fully checked (values where they
    are readable): for code that computes with sigma in PyTorch rather than passing it to a raw op."""
    s = _number(name, sigma)
    if s is not None:
        _check_sigma_number(name, s, allow_zero)
        check_sigma_range(name, s, dtype)
        return torch.full((batch,), s, dtype=dtype, device=device)
    if sigma.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {sigma.dtype}")
    if sigma.device != torch.device(device):
        raise ValueError(f"{name} is on {sigma.device} but x is on {device}")
    if sigma.dim() > 1 or (sigma.dim() == 1 and sigma.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be a scalar or have shape [B] = [{batch}], got {tuple(sigma.shape)}")
    if sigma.numel() and values_readable(sigma, requested=False):
        _check_sigma_values(name, sigma, allow_zero)
    return sigma.reshape(-1).expand(batch) if sigma.numel() == 1 else sigma
