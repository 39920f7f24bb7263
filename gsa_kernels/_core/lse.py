"""The one exact merge of streamed log-sum-exp states (docs/math.md section 3).

A partial state over a subset of components (a thread's chunks, a GPU split, a file chunk, a rank's
shard) is, per row b: the running max m_b, the sum l_b = sum_i exp(logit_i - m_b), the weighted sum
acc_b = sum_i exp(logit_i - m_b) v_i [d], and optionally a coefficient a_b of (x - ctr) kept apart
so that the denoiser is never formed from a difference of nearly equal terms. Merging S states:

    M = max_s m_s,  e_s = exp(m_s - M),  W = sum_s e_s l_s,
    out = (sum_s e_s acc_s + (sum_s e_s a_s) (x - ctr)) / W,   log W_total = M + log W.

A state with no weight has m = -inf and contributes e = 0; a row with no weight at all gets M = 0,
W = 0, out = 0 and log W = -inf, never NaN. The sums are elementwise products and reductions, never a
matmul, so global TF32 settings cannot change the result.

Two implementations of the one formula: on CUDA tensors one Triton kernel (`_core/triton_lse.py`: a single
launch instead of a dozen elementwise ops); elsewhere the PyTorch code below, which is also the kernel's
reference. `kernel=True` runs the kernel on any device (under TRITON_INTERPRET=1 on CPU tensors).
`merge_mixture` adds the epilogue of the mixture ops (centre, sigma^2 scale, Gaussian normaliser) to the
same single launch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG2PI = math.log(2 * math.pi)

class MergedState(NamedTuple):
    out: torch.Tensor     # [B, d] merged weighted mean
    log_w: torch.Tensor   # [B] log of the total weight, M + log W (-inf for a row with no weight)
    shift: torch.Tensor   # [B] the common max M (0 where every state is empty)
    inv_w: torch.Tensor   # [B] 1 / W relative to shift (0 where W = 0)


def safe_shift(m: torch.Tensor) -> torch.Tensor:
    """The max used as the exponent shift: m itself, or 0 where m = -inf (keeps exp(m - shift) NaN-free).
    One op (a NaN or +inf m stays as it is, so a bad state is not hidden)."""
    return torch.nan_to_num(m, nan=math.nan, posinf=math.inf, neginf=0.0)


def _use_kernel(kernel: bool | None, t: torch.Tensor) -> bool:
    return t.device.type == "cuda" if kernel is None else kernel


def merge_states(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, x_coef: torch.Tensor | None = None,
                 xr: torch.Tensor | None = None, *, kernel: bool | None = None) -> MergedState:
    """Merge S states m, l [S, B], acc [S, B, d] (x_coef [S, B] with xr = x - ctr [B, d], or None). m may be
    float64 over float32 states; shift and log_w are then float64.

    kernel: None = the Triton kernel for CUDA tensors, PyTorch otherwise; True / False forces one."""
    if _use_kernel(kernel, acc):
        from . import triton_lse

        out, log_w, shift, inv_w = triton_lse.merge(*(t.contiguous() if t is not None else None
                                                      for t in (m, l, acc, x_coef, xr)))
        return MergedState(out, log_w, shift, inv_w)
    shift = safe_shift(m.amax(dim=0))
    e = torch.exp(m - shift)                              # [S, B]
    if e.dtype != acc.dtype:  # float64 maxima of float32 states (the mixture kernels): exact shift, e in acc's dtype
        e = e.to(acc.dtype)
    w = (e * l).sum(0)                                    # [B]
    num = (e.unsqueeze(-1) * acc).sum(0)                  # [B, d]: no bmm, immune to TF32 flags
    if x_coef is not None:
        num = torch.addcmul(num, (e * x_coef).sum(0).unsqueeze(-1), xr)
    inv_w = torch.where(w > 0, w.reciprocal(), 0.0)
    return MergedState(num * inv_w.unsqueeze(-1), shift + torch.log(w), shift, inv_w)


def merge_mixture(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, x_coef: torch.Tensor | None,
                  x: torch.Tensor, ctr: torch.Tensor, s2: torch.Tensor, *, add_ctr: bool, divide_by_s2: bool,
                  log_norm_scale: float, stats: bool = False, kernel: bool | None = None):
    """merge_states with xr = x - ctr, then the mixture ops' epilogue (docs/math.md section 3):
    out = merged (+ ctr if add_ctr) (/ s2 if divide_by_s2), log_z = log W - log_norm_scale (log 2 pi + log s2).
    Inputs contiguous, s2 [B]. Returns (out [B, d], log_z [B], shift [B], inv_w [B]) in acc's dtype (shift
    and inv_w: None unless stats)."""
    if _use_kernel(kernel, acc):
        from . import triton_lse

        return triton_lse.merge(m, l, acc, x_coef, x, ctr, s2, add_ctr=add_ctr, divide_by_s2=divide_by_s2,
                                log_norm_scale=log_norm_scale, stats=stats)
    xr = x.to(acc.dtype) - ctr if x_coef is not None else None
    merged = merge_states(m, l, acc, x_coef, xr, kernel=False)
    out = merged.out
    if divide_by_s2:
        out = out / s2[:, None]
    if add_ctr:
        out = out + ctr
    log_z = merged.log_w - log_norm_scale * (LOG2PI + torch.log(s2)) if log_norm_scale else merged.log_w
    return out, log_z, merged.shift if stats else None, merged.inv_w if stats else None


def merge_normalized(outs: torch.Tensor, log_zs: torch.Tensor):
    """Merge S normalized partials (out_s = acc_s / l_s, log_z_s = m_s + log l_s): outs [S, B, ...],
    log_zs [S, B] -> (out [B, ...], log_z [B])."""
    S, B = log_zs.shape
    flat = outs.reshape(S, B, -1)
    merged = merge_states(log_zs, flat.new_ones(S, B), flat)
    return merged.out.to(outs.dtype).reshape(outs.shape[1:]), merged.log_w
