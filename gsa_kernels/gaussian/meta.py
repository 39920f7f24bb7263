"""Shape, dtype and device checks of the Gaussian ops (no data reads) and their fake kernels.

The one Python check of a raw op's inputs: the fake kernels (torch.compile, meta tensors) and the CUDA
kernels (gaussian/cuda.py) call it; the CPU kernels check the same in C++.
"""
from __future__ import annotations

import math

import torch

from .. import _library
from .._validation import FLOAT_DTYPES, check_sigma_meta, check_tensor
from .map_kind import OP_MAP_KINDS, TELEPORT

_library.load_library()


def check_parameters(mean, basis, eigvals=None, lam_perp=None, *, d=None, device=None,
                     dtypes=FLOAT_DTYPES) -> tuple[int, int]:
    """(d, r) of valid Gaussian parameters; d and device (from x) are checked when given."""
    check_tensor("mean", mean, ndim=1, dtypes=dtypes, device=device)
    if d is not None and mean.shape[0] != d:
        raise ValueError(f"mean must have shape [d] = [{d}] to match x, got {tuple(mean.shape)}")
    d, device = mean.shape[0], mean.device
    check_tensor("basis", basis, ndim=2, dtypes=dtypes, device=device)
    if basis.shape[0] != d:
        raise ValueError(f"basis must have shape [d, r] with d = {d}, got {tuple(basis.shape)}")
    r = basis.shape[1]
    if not 1 <= r <= d:
        raise ValueError(f"basis must have 1 <= r <= d = {d}, got r = {r}")
    if eigvals is not None:
        check_tensor("eigvals", eigvals, ndim=1, dtypes=dtypes, device=device)
        if eigvals.shape[0] != r:
            raise ValueError(f"eigvals must have shape [r] = [{r}], got {tuple(eigvals.shape)}")
    if lam_perp is not None:
        check_tensor("lam_perp", lam_perp, dtypes=dtypes, device=device)
        if lam_perp.numel() != 1:
            raise ValueError(f"lam_perp must be a scalar tensor, got shape {tuple(lam_perp.shape)}")
    return d, r


def check_gaussian(x, mean, basis, eigvals=None, lam_perp=None) -> tuple[int, int, int]:
    """(B, d, r) of valid op arguments; ValueError / TypeError naming the first bad one."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B, ...] with at least one data dimension, got {tuple(x.shape)}")
    d_x = x.shape[1] if x.dim() == 2 else math.prod(x.shape[1:])
    d, r = check_parameters(mean, basis, eigvals, lam_perp, d=d_x, device=x.device)
    return x.shape[0], d, r


def check_map(kind, x, mean, basis, eigvals, lam_perp, sigma_a, sigma_b=None) -> tuple[int, int, int]:
    """check_gaussian plus the sigma argument(s) of the map."""
    shape = check_gaussian(x, mean, basis, eigvals, lam_perp)
    check_sigma_meta("sigma_from" if kind == TELEPORT else "sigma", sigma_a, x)
    if kind == TELEPORT:
        check_sigma_meta("sigma_to", sigma_b, x)
    return shape


@torch.library.register_fake("gsa::project")
def _project_fake(x, mean, basis):
    _, _, r = check_gaussian(x, mean, basis)
    return x.new_empty((x.shape[0], r))


def _fake_map(kind):
    def fake(x, mean, basis, eigvals, lam_perp, sigma_a, sigma_b=None):
        check_map(kind, x, mean, basis, eigvals, lam_perp, sigma_a, sigma_b)
        return x.new_empty(x.shape)

    return fake


for _op, _kind in OP_MAP_KINDS.items():
    torch.library.register_fake(f"gsa::{_op}")(_fake_map(_kind))
