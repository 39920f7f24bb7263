"""Autograd of the mixture ops with respect to x (torch.library.register_autograd; docs/math.md section 3.4).

The denoiser's Jacobian is J = sum_i w_i A_i + Cov_w(D_i) / sigma^2 (A_i the symmetric Jacobian of
component i's affine denoiser; for the training set A_i = 0 and D_i = x_i), so J^T v is one more
streaming pass over the components (gsa::gmm_vjp, gsa::delta_mixture_vjp), memory flat in K; the
covariance is accumulated about the forward's denoiser, so nothing cancels. The score output is
(D - x) / sigma^2, whose vector-Jacobian product is (J^T v - v) / sigma^2; log_z's gradient is the
score (taken from the forward when it returned the score, else one forward pass with score=True).
Parameters are constants: one that requires grad is an error, not a silently missing gradient. The
posterior weights output is not differentiable (a backward through it raises).
"""
from __future__ import annotations

import torch

from .. import _library
from .._core.dtypes import compute_dtype

_library.load_library()

_FLT_MIN = torch.finfo(torch.float32).tiny
# Argument names after x, per op, as in the schemas (csrc/ops.cpp).
_PARAMS = {
    "gmm_forward": ("log_weights", "means", "bases", "eigvals", "lam_perp", "sigma", "center"),
    "delta_mixture_forward": ("points", "log_weights", "sigma", "center"),
}


def _setup(op_name):
    def setup_context(ctx, inputs, output):
        for name, t in zip(_PARAMS[op_name], inputs[1:]):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(f"gsa::{op_name} differentiates with respect to x only; {name} requires grad")
        ctx.inputs = inputs
        ctx.out = output[0]

    return setup_context


def _input_grad(x, sigma, out, score, g_out, g_logz, vjp, score_of):
    """dL/dx from the cotangents of (out, log_z): vjp(frame, v) = J^T v, score_of() = the score."""
    ct = compute_dtype(x, out)
    shape = (-1,) + (1,) * (x.dim() - 1)
    s2 = (sigma.to(ct).reshape(-1) ** 2).clamp_min(_FLT_MIN).reshape(shape)
    grad = torch.zeros(x.shape, dtype=ct, device=x.device)
    if g_out is not None:
        frame = out if not score else x.to(ct) + s2 * out.to(ct)  # the denoiser, about which J is formed
        jtv = vjp(frame.to(x.dtype).contiguous(), g_out.contiguous()).to(ct)
        grad += (jtv - g_out.to(ct)) / s2 if score else jtv
    if g_logz is not None:
        s = out if score else score_of()
        grad += g_logz.to(ct).reshape(shape) * s.to(ct)
    return grad.to(x.dtype)


def _gmm_backward(ctx, g_out, g_logz, g_w):
    if g_w is not None and g_w.numel() and bool(g_w.ne(0).any()):
        raise NotImplementedError("gsa::gmm_forward: the posterior weights are not differentiable; "
                                  "differentiate the denoiser, the score or log_prob instead")
    x, lw, means, bases, eigvals, lam_perp, sigma, center, score, _, chunk = ctx.inputs
    grad = _input_grad(
        x, sigma, ctx.out, score, g_out, g_logz,
        lambda frame, v: torch.ops.gsa.gmm_vjp(x, lw, means, bases, eigvals, lam_perp, sigma, frame, v, center, chunk),
        lambda: torch.ops.gsa.gmm_forward(x, lw, means, bases, eigvals, lam_perp, sigma, center, True, False, chunk)[0])
    return (grad,) + (None,) * 10


def _delta_backward(ctx, g_out, g_logz):
    x, points, lw, sigma, center, score, chunk = ctx.inputs
    grad = _input_grad(
        x, sigma, ctx.out, score, g_out, g_logz,
        lambda frame, v: torch.ops.gsa.delta_mixture_vjp(x, points, lw, sigma, frame, v, center, chunk),
        lambda: torch.ops.gsa.delta_mixture_forward(x, points, lw, sigma, center, True, chunk)[0])
    return (grad,) + (None,) * 6


torch.library.register_autograd("gsa::gmm_forward", _gmm_backward, setup_context=_setup("gmm_forward"))
torch.library.register_autograd("gsa::delta_mixture_forward", _delta_backward,
                                setup_context=_setup("delta_mixture_forward"))
