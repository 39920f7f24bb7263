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
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class MergedState(NamedTuple):
    out: torch.Tensor     # [B, d] merged weighted mean
    log_w: torch.Tensor   # [B] log of the total weight, M + log W (-inf for a row with no weight)
    shift: torch.Tensor   # [B] the common max M (0 where every state is empty)
    inv_w: torch.Tensor   # [B] 1 / W relative to shift (0 where W = 0)


def safe_shift(m: torch.Tensor) -> torch.Tensor:
    """The max used as the exponent shift: m itself, or 0 where m = -inf (keeps exp(m - shift) NaN-free).
    One op (a NaN or +inf m stays as it is, so a bad state is not hidden)."""
    return torch.nan_to_num(m, nan=math.nan, posinf=math.inf, neginf=0.0)


def merge_states(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, x_coef: torch.Tensor | None = None,
                 xr: torch.Tensor | None = None) -> MergedState:
    """Merge S states m, l [S, B], acc [S, B, d] (x_coef [S, B] with xr = x - ctr [B, d], or None).

    Few, elementwise ops (each is a kernel launch on a GPU): the host cost of the merge is part of every
    mixture call."""
    shift = safe_shift(m.amax(dim=0))
    e = torch.exp(m - shift)                              # [S, B]
    w = (e * l).sum(0)                                    # [B]
    num = (e.unsqueeze(-1) * acc).sum(0)                  # [B, d]: no bmm, immune to TF32 flags
    if x_coef is not None:
        num = torch.addcmul(num, (e * x_coef).sum(0).unsqueeze(-1), xr)
    inv_w = torch.where(w > 0, w.reciprocal(), 0.0)
    return MergedState(num * inv_w.unsqueeze(-1), shift + torch.log(w), shift, inv_w)


def merge_normalized(outs: torch.Tensor, log_zs: torch.Tensor):
    """Merge S normalized partials (out_s = acc_s / l_s, log_z_s = m_s + log l_s): outs [S, B, ...],
    log_zs [S, B] -> (out [B, ...], log_z [B])."""
    S, B = log_zs.shape
    flat = outs.reshape(S, B, -1)
    merged = merge_states(log_zs, torch.ones_like(log_zs), flat.to(log_zs.dtype))
    return merged.out.to(outs.dtype).reshape(outs.shape[1:]), merged.log_w
