"""torch.ops.gsa Gaussian ops: thin Python wrappers, fake kernels, CUDA (Triton) kernels and autograd.

The CPU kernels are C++ (csrc/gaussian_cpu.cpp); the schemas are in csrc/ops.cpp.
"""
from __future__ import annotations

import torch

from .. import _library, config
from .._validation import FLOAT_DTYPES, as_sigma, check_nonneg, check_tensor
from . import reference

_library.load_library()

try:  # Triton is optional: without it, CUDA tensors run the (unfused) PyTorch path.
    from . import triton_gaussian
except ImportError:  # pragma: no cover
    triton_gaussian = None

_OPS = {"denoise": "gaussian_denoise", "score": "gaussian_score", "teleport": "teleport"}
_MAP_IDS = {"gaussian_denoise": 1, "gaussian_score": 2, "teleport": 3}


# ----------------------------------------------------------------------------------------------
# Metadata checks shared by the wrappers, the fake kernels and the CUDA kernels (no data reads).
def _check_meta(x, mean, basis, eigvals=None, lam_perp=None):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B, ...] with at least one data dimension, got {tuple(x.shape)}")
    d = x[0].numel() if x.shape[0] else int(torch.Size(x.shape[1:]).numel())
    check_tensor("mean", mean, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    if mean.shape[0] != d:
        raise ValueError(f"mean must have shape [d] = [{d}] to match x of shape {tuple(x.shape)}, got {tuple(mean.shape)}")
    check_tensor("basis", basis, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    if basis.shape[0] != d:
        raise ValueError(f"basis must have shape [d, r] with d = {d}, got {tuple(basis.shape)}")
    r = basis.shape[1]
    if not 1 <= r <= d:
        raise ValueError(f"basis must have 1 <= r <= d = {d}, got r = {r}")
    if eigvals is not None:
        check_tensor("eigvals", eigvals, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        if eigvals.shape[0] != r:
            raise ValueError(f"eigvals must have shape [r] = [{r}], got {tuple(eigvals.shape)}")
    if lam_perp is not None:
        check_tensor("lam_perp", lam_perp, dtypes=FLOAT_DTYPES, device=x.device)
        if lam_perp.numel() != 1:
            raise ValueError(f"lam_perp must be a scalar tensor, got shape {tuple(lam_perp.shape)}")
    return x.shape[0], d, r


def _check_sigma_meta(name, sigma, x):
    check_tensor(name, sigma, dtypes=FLOAT_DTYPES, device=x.device)
    if sigma.dim() > 1 or (sigma.dim() == 1 and sigma.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"{name} must be a scalar or have shape [B] = [{x.shape[0]}], got {tuple(sigma.shape)}")


def _compute_dtype(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


# ----------------------------------------------------------------------------------------------
# Fake kernels (shape propagation for torch.compile / meta tensors).
@torch.library.register_fake("gsa::project")
def _project_fake(x, mean, basis):
    _check_meta(x, mean, basis)
    return x.new_empty((x.shape[0], basis.shape[1]))


def _map_fake(x, mean, basis, eigvals, lam_perp, *sigmas):
    _check_meta(x, mean, basis, eigvals, lam_perp)
    return x.new_empty(x.shape)


for _op in _MAP_IDS:
    torch.library.register_fake(f"gsa::{_op}")(_map_fake)


# ----------------------------------------------------------------------------------------------
# CUDA kernels: Triton for float32/half storage; float64 takes the PyTorch path (exact, no fusion).
def _sigma_vector(sigma, batch, dtype):
    return sigma.to(dtype).reshape(-1).expand(batch).contiguous()


def _project_cuda(x, mean, basis):
    _, d, r = _check_meta(x, mean, basis)
    x2 = x.reshape(x.shape[0], d)
    if triton_gaussian is None or _compute_dtype(x, mean, basis) == torch.float64:
        ct = _compute_dtype(x, mean, basis)
        return reference.project(x2.to(ct), mean.to(ct), basis.to(ct)).to(x.dtype)
    c = triton_gaussian.project(x2.contiguous(), mean.float().contiguous(), basis.float().contiguous(),
                                config.get_precision())
    return c.to(x.dtype)


torch.library.register_kernel("gsa::project", "cuda", _project_cuda)


def _make_map_cuda(op_name):
    map_id = _MAP_IDS[op_name]
    ref = getattr(reference, op_name)

    def kernel(x, mean, basis, eigvals, lam_perp, sigma_a, sigma_b=None):
        _, d, _ = _check_meta(x, mean, basis, eigvals, lam_perp)
        sigma_b = sigma_a if sigma_b is None else sigma_b
        ct = _compute_dtype(x, mean, basis, eigvals)
        if triton_gaussian is None or ct == torch.float64:
            args = [t.to(ct) for t in (x, mean, basis, eigvals, lam_perp)]
            sig = [_sigma_vector(s, x.shape[0], ct) for s in ((sigma_a,) if map_id != 3 else (sigma_a, sigma_b))]
            return ref(*args, *sig).to(x.dtype)
        x2 = x.reshape(x.shape[0], d).contiguous()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        f32 = [t.float().contiguous() for t in (mean, basis, eigvals, lam_perp.reshape(1))]
        triton_gaussian.gaussian_map(map_id, x2, *f32, _sigma_vector(sigma_a, x.shape[0], torch.float32),
                                     _sigma_vector(sigma_b, x.shape[0], torch.float32), out.view(x.shape[0], d),
                                     config.get_precision())
        return out

    return kernel


for _op in _MAP_IDS:
    torch.library.register_kernel(f"gsa::{_op}", "cuda")(_make_map_cuda(_op))


# Autograd with respect to x is registered in C++ (csrc/gaussian_autograd.cpp).


# ----------------------------------------------------------------------------------------------
# Python API: validate (errors name the argument), turn numbers into tensors, call the op.
def _params(x, mean, basis, eigvals, lam_perp, check_values=True):
    if not isinstance(lam_perp, torch.Tensor):
        lam_perp = torch.tensor(float(lam_perp), dtype=_compute_dtype(mean), device=x.device)
    _check_meta(x, mean, basis, eigvals, lam_perp)
    if check_values:
        check_nonneg("eigvals", eigvals)
        check_nonneg("lam_perp", lam_perp)
    return lam_perp


def project(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Eigenbasis coefficients c = U^T (x - mu): [B, ...] -> [B, r]."""
    _check_meta(x, mean, basis)
    return torch.ops.gsa.project(x, mean, basis)


# check_values=False is for callers whose parameters were validated already (GaussianModel checks its
# buffers once, at construction and on load_state_dict), which keeps the B = 1 host overhead small.
def gaussian_denoise(x, mean, basis, eigvals, lam_perp, sigma, *, check_values: bool = True) -> torch.Tensor:
    """Gaussian posterior mean D(x; sigma) = E[x0 | x] (docs/math.md section 2.1)."""
    lam_perp = _params(x, mean, basis, eigvals, lam_perp, check_values)
    s = as_sigma("sigma", sigma, x.shape[0], x.device, dtype=_compute_dtype(x, mean))
    return torch.ops.gsa.gaussian_denoise(x, mean, basis, eigvals, lam_perp, s)


def gaussian_score(x, mean, basis, eigvals, lam_perp, sigma, *, check_values: bool = True) -> torch.Tensor:
    """Score grad_x log p_sigma(x) of the noised Gaussian (docs/math.md section 2.1)."""
    lam_perp = _params(x, mean, basis, eigvals, lam_perp, check_values)
    s = as_sigma("sigma", sigma, x.shape[0], x.device, dtype=_compute_dtype(x, mean))
    return torch.ops.gsa.gaussian_score(x, mean, basis, eigvals, lam_perp, s)


def teleport(x, mean, basis, eigvals, lam_perp, sigma_from, sigma_to, *, check_values: bool = True) -> torch.Tensor:
    """Exact probability-flow-ODE solution for the Gaussian from sigma_from (> 0) to sigma_to (>= 0)."""
    lam_perp = _params(x, mean, basis, eigvals, lam_perp, check_values)
    dt = _compute_dtype(x, mean)
    s0 = as_sigma("sigma_from", sigma_from, x.shape[0], x.device, dtype=dt)
    s1 = as_sigma("sigma_to", sigma_to, x.shape[0], x.device, dtype=dt, allow_zero=True)
    return torch.ops.gsa.teleport(x, mean, basis, eigvals, lam_perp, s0, s1)
