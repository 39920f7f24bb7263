"""The exact log-sum-exp merge (docs/math.md section 3) as one Triton kernel: the CUDA implementation of
`_core/lse.py` (`merge_states`, `merge_mixture`), whose PyTorch code is its CPU path and its reference.

One program per (row, d-tile), on one grid axis (no 65535 limit): it reads the row's S states m, l (and
the x coefficients a), forms M = max_s m_s, e_s = exp(m_s - M), W = sum_s e_s l_s, then its d-tile of
sum_s e_s acc_s (+ (sum_s e_s a_s)(x - ctr)) / W; a row with no weight (every m_s = -inf) gets M = 0,
W = 0, out = 0 (ctr with the centre added back) and log W = -inf, never NaN. Elementwise products and
reductions only: no matmul, so no precision setting (global TF32 flags included) changes the result.
M, the exponents m_s - M and log W are float64 (the mixture kernels' maxima are float64 logits; float32
maxima convert exactly); shift is returned in m's dtype.

The optional epilogue of the mixture ops rides along, saving a kernel launch each: the centre added
back, a division by sigma^2, and the Gaussian normaliser -scale (log 2 pi + log sigma^2) added to log W.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import LaunchPlans, cdiv, device_guard

LOG2PI = tl.constexpr(math.log(2 * math.pi))
BLOCK_S = 4      # states per step of the loop over S
BLOCK_D = 512    # columns per program: 4 contiguous float32 per thread at 4 warps
NUM_WARPS = 4


@triton.jit
def _merge_kernel(
    m_ptr, l_ptr, acc_ptr, a_ptr, x_ptr, ctr_ptr, s2_ptr, out_ptr, logw_ptr, shift_ptr, invw_ptr,
    S, B, D, n_tiles, log_norm_scale,
    HAS_X: tl.constexpr, HAS_CTR: tl.constexpr, ADD_CTR: tl.constexpr, DIV_S2: tl.constexpr,
    LOG_NORM: tl.constexpr, WRITE_STATS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // n_tiles
    tile = pid - row * n_tiles
    row64 = row.to(tl.int64)
    s_lane = tl.arange(0, BLOCK_S)
    # M = max_s m_s; 0 where every state is empty (e = exp(-inf - 0) = 0 then). The maxima and M are float64
    # (the mixture kernels' logits are float64 numbers; float32 maxima convert exactly).
    m_max = tl.full((BLOCK_S,), float("-inf"), tl.float64)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + s_lane
        mv = tl.load(m_ptr + ss.to(tl.int64) * B + row64, mask=ss < S, other=float("-inf")).to(tl.float64)
        m_max = tl.maximum(m_max, mv, propagate_nan=tl.PropagateNan.ALL)
    big = tl.max(m_max, axis=0)
    shift = tl.where(big == float("-inf"), 0.0, big)

    dd = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    num = tl.zeros((BLOCK_D,), ACC)
    w_vec = tl.zeros((BLOCK_S,), ACC)
    a_vec = tl.zeros((BLOCK_S,), ACC)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + s_lane
        s_ok = ss < S
        state = ss.to(tl.int64) * B + row64
        e = tl.exp(tl.load(m_ptr + state, mask=s_ok, other=float("-inf")).to(tl.float64) - shift).to(ACC)
        w_vec += e * tl.load(l_ptr + state, mask=s_ok, other=0.0).to(ACC)
        if HAS_X:
            a_vec += e * tl.load(a_ptr + state, mask=s_ok, other=0.0).to(ACC)
        tile_acc = tl.load(acc_ptr + state[:, None] * D + dd[None, :], mask=s_ok[:, None] & d_ok[None, :],
                           other=0.0).to(ACC)
        num += tl.sum(e[:, None] * tile_acc, axis=0)
    w = tl.sum(w_vec, axis=0)
    if HAS_CTR:
        ctr = tl.load(ctr_ptr + dd, mask=d_ok, other=0.0).to(ACC)
    if HAS_X:
        xr = tl.load(x_ptr + row64 * D + dd, mask=d_ok, other=0.0).to(ACC)
        if HAS_CTR:
            xr = xr - ctr
        num += tl.sum(a_vec, axis=0) * xr
    inv_w = tl.where(w > 0, 1.0 / tl.where(w > 0, w, 1.0), 0.0)
    out = num * inv_w
    if DIV_S2 or LOG_NORM:
        s2 = tl.load(s2_ptr + row).to(ACC)
    if DIV_S2:
        out = out / s2
    if ADD_CTR:
        out += ctr
    tl.store(out_ptr + row64 * D + dd, out, mask=d_ok)
    if tile == 0:
        log_w = shift + tl.log(w)
        if LOG_NORM:
            log_w -= log_norm_scale * (LOG2PI + tl.log(s2.to(tl.float64)))
        tl.store(logw_ptr + row, log_w)
        if WRITE_STATS:
            tl.store(shift_ptr + row, shift)
            tl.store(invw_ptr + row, inv_w)


def _tl_dtype(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


_PLANS = LaunchPlans()


def _merge_plan(S, B, D, dt, has_x, has_ctr, add_ctr, divide_by_s2, log_norm, stats):
    """(grid, n_tiles, constexprs) of one merge launch."""
    n_tiles = cdiv(D, BLOCK_D)
    return (B * n_tiles,), n_tiles, dict(
        HAS_X=has_x, HAS_CTR=has_ctr, ADD_CTR=add_ctr, DIV_S2=divide_by_s2, LOG_NORM=log_norm,
        WRITE_STATS=stats, ACC=_tl_dtype(dt), BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)


def merge(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, x_coef: torch.Tensor | None = None,
          x: torch.Tensor | None = None, ctr: torch.Tensor | None = None, s2: torch.Tensor | None = None, *,
          add_ctr: bool = False, divide_by_s2: bool = False, log_norm_scale: float = 0.0,
          stats: bool = True):
    """Merge S states m, l [S, B], acc [S, B, d] (x_coef [S, B] with x [B, d] and optional ctr [d]: the
    x term uses x - ctr) in one launch; returns (out [B, d], log_w [B], shift [B] | None, inv_w [B] | None)
    in acc's dtype. Epilogue: ctr added to out (add_ctr), out / s2 (divide_by_s2, s2 [B]),
    log_w - log_norm_scale (log 2 pi + log s2) (log_norm_scale != 0). Inputs must be contiguous."""
    S, B, D = acc.shape
    has_x = x_coef is not None
    key = (S, B, D, acc.dtype, has_x, ctr is not None, add_ctr, divide_by_s2, log_norm_scale != 0.0, stats)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.remember(key, _merge_plan(*key))
    grid, n_tiles, consts = plan
    # new_empty with the sizes as separate ints: the cheapest allocation call on the host.
    out = acc.new_empty(B, D)
    log_w = m.new_empty(B)  # m's dtype: float64 maxima give a float64 log W
    # shift in m's dtype: float64 maxima stay exact for exp(logit - shift) downstream.
    shift, inv_w = (m.new_empty(B), acc.new_empty(B)) if stats else (None, None)
    if B > 0:
        with device_guard(acc):
            _merge_kernel[grid](
                m, l, acc, x_coef if has_x else m, x if has_x else acc, ctr if ctr is not None else m,
                s2 if s2 is not None else m, out, log_w, shift if stats else log_w, inv_w if stats else log_w,
                S, B, D, n_tiles, float(log_norm_scale), **consts)
    return out, log_w, shift, inv_w


def aot_cases(full: bool = False):
    """Launch configurations for gsa_kernels.triton_aot: both accumulators, with and without the x term
    and the mixture epilogue (full adds the remaining flag combinations the launchers use)."""
    def case(dt, has_x, has_ctr, add_ctr, div_s2, log_norm, stats, m_dt=None):
        names = ("l_ptr", "acc_ptr", "a_ptr", "x_ptr", "ctr_ptr", "s2_ptr", "out_ptr", "logw_ptr", "invw_ptr")
        m_dt = m_dt or dt  # the mixture kernels' maxima are float64
        return _merge_kernel, {**{n: "*" + dt for n in names}, "m_ptr": "*" + m_dt, "shift_ptr": "*" + m_dt,
                               "S": "i32", "B": "i32", "D": "i32",
                               "n_tiles": "i32", "log_norm_scale": "fp32",
                               "HAS_X": has_x, "HAS_CTR": has_ctr, "ADD_CTR": add_ctr, "DIV_S2": div_s2,
                               "LOG_NORM": log_norm, "WRITE_STATS": stats,
                               "ACC": tl.float32 if dt == "fp32" else tl.float64,
                               "BLOCK_S": BLOCK_S, "BLOCK_D": BLOCK_D, "num_warps": NUM_WARPS}

    for dt in ("fp32", "fp64"):
        yield case(dt, False, False, False, False, False, True)   # merge_states without x (shards, chunks)
        yield case(dt, True, True, True, False, True, False, "fp64")  # training set / GMM denoiser
        if full:
            yield case(dt, True, False, False, False, False, True)  # merge_states with xr
            yield case(dt, True, True, False, True, True, False, "fp64")  # training-set score
            yield case(dt, True, True, False, False, True, False, "fp64")  # GMM score
            yield case(dt, True, True, True, False, True, True, "fp64")    # GMM with posterior weights
