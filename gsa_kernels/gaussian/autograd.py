"""Autograd of the Gaussian ops with respect to x (torch.library.register_autograd).

Each map is affine in x with a symmetric linear part L_f (docs/math.md section 2.1), so the
vector-Jacobian product is the same op applied to the cotangent with mean = 0: denoise/teleport give
0 + L_f(g), score gives L_f(g); project gives grad_c U^T. The backward calls the ops themselves, so it
runs on whatever kernel (C++ or Triton) the forward used, and is differentiable again (gradgradcheck).
Parameters are constants: one that requires grad is an error, not a silently missing gradient.
"""
from __future__ import annotations

import torch

from .. import _library

_library.load_library()

# Argument names after x, per op, as in the schemas (csrc/ops.cpp).
_PARAMS = {
    "project": ("mean", "basis"),
    "gaussian_denoise": ("mean", "basis", "eigvals", "lam_perp", "sigma"),
    "gaussian_score": ("mean", "basis", "eigvals", "lam_perp", "sigma"),
    "teleport": ("mean", "basis", "eigvals", "lam_perp", "sigma_from", "sigma_to"),
}


def _check_constants(op_name, inputs):
    for name, t in zip(_PARAMS[op_name], inputs[1:]):
        if t.requires_grad:
            raise RuntimeError(f"gsa::{op_name} differentiates with respect to x only; {name} requires grad")


def _make_setup_context(op_name):
    def setup_context(ctx, inputs, output):
        _check_constants(op_name, inputs)
        ctx.params = inputs[1:]
        ctx.x_shape = inputs[0].shape

    return setup_context


def _make_map_backward(op):
    def backward(ctx, grad):
        mean, *rest = ctx.params
        return (op(grad.contiguous(), torch.zeros_like(mean), *rest),) + (None,) * len(ctx.params)

    return backward


def _project_backward(ctx, grad):
    _, basis = ctx.params
    return (grad @ basis.T.to(grad.dtype)).reshape(ctx.x_shape), None, None


for _name in ("gaussian_denoise", "gaussian_score", "teleport"):
    torch.library.register_autograd(f"gsa::{_name}", _make_map_backward(getattr(torch.ops.gsa, _name)),
                                    setup_context=_make_setup_context(_name))
torch.library.register_autograd("gsa::project", _project_backward, setup_context=_make_setup_context("project"))
