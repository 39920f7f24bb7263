"""Triton kernels of the mixture VJP (docs/math.md section 3.4): J^T v of the denoiser as one more
streaming pass over the points / components, with the forward's online log-sum-exp and split-K layout
(triton_mixture.py, whose device helpers, tile conventions and plan cache these kernels share).

    J^T v = E2 + (E0 - (v.E1) E1) / sigma^2,
    E0 = sum_i w_i (v.(D_i - F)) (D_i - F),   E1 = sum_i w_i (D_i - F),   E2 = sum_i w_i A_i v,

with F the forward's denoiser (the frame: E1 = D - F is tiny and E0 a sum of small terms). A program owns a tile
of BLOCK_B rows and a contiguous range of components (its split) and keeps, per row, the running max m and
sum l of the online softmax and the accumulators E0, E1 (and E2 for the GMM) unnormalised in a workspace
[S, n_acc B, d] (n_acc = 2 or 3 blocks of B rows sharing m and l). The S partial states are merged exactly
by the one merge of _core/lse.py (merge_states); the epilogue above is one row reduction and two
elementwise ops (three for the GMM).

* ``_delta_vjp_partial_kernel`` (training set, D_i = x_i, A_i = 0). Per chunk of BLOCK_N points: pass 1
  over d forms the forward's logits with the forward's device functions (chunk frame c, float64 row term and
  running max, float64 tiles for d <= EXACT_DIM) and, from the same tiles, v.(x_i - c) by a second ``tl.dot``
  and v.(c - F); beta_i = v.(x_i - F) is their sum. Pass 2 over d adds (p beta) (x_i - F) and p (x_i - F) as
  a GEMM on x_i - c plus a rank-one term in c - F. At the end of its split the max is the exact dominant
  logit, as in the forward (docs/math.md section 3.2).
* ``_gmm_vjp_partial_kernel`` (GMM, any rank r). One component at a time, as the forward: pass 1 computes
  q = ||x - mu_k||^2 from exact float64 differences, the float64 logit (the forward's _gmm_logit),
  v.(mu_k - F), and per BLOCK_R slice of modes c = U_k^T (x - mu_k) and
  w = U_k^T v (both kept in a [S, B, 2 r] scratch). D_k - F = cm (mu_k - F) + cx (x - F) + U_k (g c) is
  then formed elementwise from direct differences (cm, cx, g the forward's denoiser coefficients: 1 - a,
  a, b - a), so no term is a difference of large numbers; A_k v = cx v + U_k (g w).

Extra memory: n_acc S B (d + 2) numbers (+ 2 S B r for the GMM) with n_acc S B d <= 2^25 on a GPU: flat in
the number of points / components. Accumulation in float32 for float32 / half storage, float64 for
float64 inputs ("ieee" dots). Runs under TRITON_INTERPRET=1 on CPU tensors; gsa_kernels.triton_aot
compiles the launch configurations below for sm_80 / sm_89 / sm_90.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.cache import as_contiguous
from .._core.dtypes import compute_dtype
from .._core.launch import cdiv, device_guard, split_count
from .._core.lse import merge_states
from .triton_mixture import (AOT_PRECISIONS, VAR_MAX, VAR_MIN, WORKSPACE_ELEMENTS, _chunk_columns, _chunk_frame_slice,
                             _chunk_logits, _chunk_softmax, _delta_split_start, _exact_dominant_logit, _gmm_logit,
                             _gmm_mode_gain, _gmm_row_tile, _log1p, _online_update, _PLANS, _remember, _tl_dtype,
                             aot_delta_variants, clamped_sigma_sq, delta_plan, gmm_operands)


@triton.jit
def _load_rows(ptr, idx, idx_ok, d0, D, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """[len(idx), BLOCK_D] tile of rows idx of a row-major [*, D] matrix, zero outside."""
    dd = d0 + tl.arange(0, BLOCK_D)
    mask = idx_ok[:, None] & (dd < D)[None, :]
    return tl.load(ptr + idx.to(tl.int64)[:, None] * D + dd[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_shared_state(max_ptr, sum_ptr, m_run, l_run, pid_s, B, rows, row_ok, N_ACC: tl.constexpr):
    """The row's m and l, once per accumulator block: the merge sees N_ACC blocks of B rows per split."""
    for j in tl.static_range(N_ACC):
        tl.store(max_ptr + (pid_s * N_ACC + j) * B + rows, m_run, mask=row_ok)
        tl.store(sum_ptr + (pid_s * N_ACC + j) * B + rows, l_run, mask=row_ok)


@triton.jit
def _delta_vjp_partial_kernel(
    x_ptr, pts_ptr, lw_ptr, s2_ptr, f_ptr, v_ptr, acc_ptr, max_ptr, sum_ptr,
    B, N, D, n_per_split,
    HAS_LW: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, LOGIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_s, rows, row_ok, half_inv_s2, n_lo, n_hi, m_run, arg_run, l_run = _delta_split_start(
        s2_ptr, B, N, n_per_split, ACC, BLOCK_B)
    rows64 = rows.to(tl.int64)  # B d may exceed 2^31 elements
    e0_base = acc_ptr + (pid_s * 2 * B).to(tl.int64) * D
    e1_base = acc_ptr + (pid_s * 2 * B + B).to(tl.int64) * D
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols, col_ok, inv_count = _chunk_columns(n0, n_hi, BLOCK_N, LOGIT)
        # 1-2. The forward's logits in the chunk's frame c, with v.(x_i - c) and v.(c - F) from the same tiles.
        row, rel, v_pts, v_cf = _chunk_logits(x_ptr, pts_ptr, lw_ptr, v_ptr, f_ptr, rows, row_ok, cols, col_ok,
                                              inv_count, half_inv_s2, D, HAS_LW, True, PRECISION, LOGIT,
                                              BLOCK_B, BLOCK_N, BLOCK_D)
        m_run, arg_run, alpha, p = _chunk_softmax(row, rel, n0, m_run, arg_run, LOGIT)
        pb = p * (v_pts + v_cf[:, None])  # p beta_i, beta_i = v.(x_i - F)
        p_sum = tl.sum(p, axis=1)
        pb_sum = tl.sum(pb, axis=1)
        l_run = l_run * alpha.to(ACC) + p_sum.to(ACC)
        alpha = alpha.to(LOGIT)
        # 3. E0 = alpha E0 + sum_i p beta_i (x_i - F), E1 = alpha E1 + sum_i p (x_i - F) with x_i - F = (x_i - c)
        #    + (c - F): a GEMM on the chunk's small differences plus a rank-one term, in LOGIT.
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            amask = row_ok[:, None] & (dd < D)[None, :]
            offs = rows64[:, None] * D + dd[None, :]
            pk, frame = _chunk_frame_slice(pts_ptr, cols, col_ok, d0, D, inv_count, BLOCK_D, LOGIT)
            cf = frame[None, :] - _load_rows(f_ptr, rows, row_ok, d0, D, BLOCK_D, LOGIT)
            e0 = tl.load(e0_base + offs, mask=amask, other=0.0).to(LOGIT) * alpha[:, None] + pb_sum[:, None] * cf
            e0 += tl.dot(pb, pk, input_precision=PRECISION)
            tl.store(e0_base + offs, e0.to(ACC), mask=amask)
            e1 = tl.load(e1_base + offs, mask=amask, other=0.0).to(LOGIT) * alpha[:, None] + p_sum[:, None] * cf
            e1 += tl.dot(p, pk, input_precision=PRECISION)
            tl.store(e1_base + offs, e1.to(ACC), mask=amask)
        # The next chunk reloads these tiles, possibly in another thread layout: order the accesses.
        tl.debug_barrier()
    m_run = _exact_dominant_logit(x_ptr, pts_ptr, lw_ptr, rows, row_ok, m_run, arg_run, half_inv_s2, D, HAS_LW,
                                  BLOCK_B, BLOCK_D)
    _store_shared_state(max_ptr, sum_ptr, m_run, l_run, pid_s, B, rows, row_ok, 2)


@triton.jit
def _gmm_vjp_partial_kernel(
    x_ptr, means_ptr, bases_ptr, eig_ptr, lp_ptr, lw_ptr, s2_ptr, f_ptr, v_ptr,
    acc_ptr, max_ptr, sum_ptr, c_ptr,
    B, K, D, R, k_per_split,
    HAS_BASES: tl.constexpr, HAS_LP: tl.constexpr, FULL_RANK: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_s = tl.program_id(1)
    rows, row_ok, s2, s2_f64 = _gmm_row_tile(s2_ptr, B, BLOCK_B, ACC)
    rows64 = rows.to(tl.int64)  # B d may exceed 2^31 elements
    v_xf = tl.zeros((BLOCK_B,), ACC)  # v.(x - F)
    for d0 in range(0, D, BLOCK_D):
        xt = _load_rows(x_ptr, rows, row_ok, d0, D, BLOCK_D, ACC)
        ft = _load_rows(f_ptr, rows, row_ok, d0, D, BLOCK_D, ACC)
        v_xf += tl.sum(_load_rows(v_ptr, rows, row_ok, d0, D, BLOCK_D, ACC) * (xt - ft), axis=1)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    m_run = tl.full((BLOCK_B,), float("-inf"), tl.float64)
    l_run = tl.zeros((BLOCK_B,), ACC)
    e0_base = acc_ptr + (pid_s * 3 * B).to(tl.int64) * D
    e1_base = acc_ptr + (pid_s * 3 * B + B).to(tl.int64) * D
    e2_base = acc_ptr + (pid_s * 3 * B + 2 * B).to(tl.int64) * D
    c_base = c_ptr + (pid_s * B).to(tl.int64) * (2 * R)  # this split's [B, 2 r] scratch: c, then w = U_k^T v
    ones = tl.full((BLOCK_B,), 1.0, ACC)
    for k in range(k_lo, k_hi):
        k64 = tl.cast(k, tl.int64)
        base_k = bases_ptr + k64 * D * R
        # Pass 1a: q = ||x - mu_k||^2 from the exact float64 differences (as the forward), and v.(mu_k - F).
        q = tl.zeros((BLOCK_B,), tl.float64)
        v_mf = tl.zeros((BLOCK_B,), ACC)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            mask = row_ok[:, None] & d_ok[None, :]
            mu = tl.load(means_ptr + k64 * D + dd, mask=d_ok, other=0.0).to(tl.float64)
            xc = tl.where(mask, _load_rows(x_ptr, rows, row_ok, d0, D, BLOCK_D, tl.float64) - mu[None, :], 0.0)
            mf = tl.where(mask, mu.to(ACC)[None, :] - _load_rows(f_ptr, rows, row_ok, d0, D, BLOCK_D, ACC), 0.0)
            q += tl.sum(xc * xc, axis=1)
            v_mf += tl.sum(_load_rows(v_ptr, rows, row_ok, d0, D, BLOCK_D, ACC) * mf, axis=1)
        if HAS_LP:
            lam_perp = tl.load(lp_ptr + k).to(ACC)
        else:
            lam_perp = 0.0
        v_perp = tl.minimum(tl.maximum(lam_perp + s2, VAR_MIN), VAR_MAX)
        # The forward's denoiser coefficients of D_k - F = cm (mu_k - F) + cx (x - F) + U_k (g c).
        if FULL_RANK:
            cx = tl.zeros((BLOCK_B,), ACC)
            cm = cx + 1.0
        else:
            cm = s2 / v_perp
            cx = lam_perp / v_perp
        quad = tl.zeros((BLOCK_B,), tl.float64)
        logdet = tl.zeros((BLOCK_B,), tl.float64)
        proj = tl.zeros((BLOCK_B,), tl.float64)
        v_gc = tl.zeros((BLOCK_B,), ACC)  # v.U_k (g c) = sum_modes g c w
        if HAS_BASES:
            # Pass 1b: c = U_k^T (x - mu_k) and w = U_k^T v per BLOCK_R slice of modes, kept for pass 2.
            for r0 in range(0, R, BLOCK_R):
                modes = r0 + tl.arange(0, BLOCK_R)
                mode_ok = modes < R
                c = tl.zeros((BLOCK_B, BLOCK_R), ACC)
                w = tl.zeros((BLOCK_B, BLOCK_R), ACC)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    d_ok = dd < D
                    mu = tl.load(means_ptr + k64 * D + dd, mask=d_ok, other=0.0).to(ACC)
                    xc = tl.where(row_ok[:, None] & d_ok[None, :],
                                  _load_rows(x_ptr, rows, row_ok, d0, D, BLOCK_D, ACC) - mu[None, :], 0.0)
                    ut = tl.load(base_k + dd.to(tl.int64)[:, None] * R + modes[None, :],
                                 mask=d_ok[:, None] & mode_ok[None, :], other=0.0).to(ACC)
                    c += tl.dot(xc, ut, input_precision=PRECISION)
                    w += tl.dot(_load_rows(v_ptr, rows, row_ok, d0, D, BLOCK_D, ACC), ut, input_precision=PRECISION)
                lam = tl.load(eig_ptr + k64 * R + modes, mask=mode_ok, other=0.0).to(ACC)
                v = tl.minimum(tl.maximum(lam[None, :] + s2[:, None], VAR_MIN), VAR_MAX)
                quad += tl.sum(tl.where(mode_ok[None, :], c * c / v, 0.0), axis=1).to(tl.float64)
                logdet += tl.sum(tl.where(mode_ok[None, :], _log1p(tl.minimum(lam[None, :] / s2[:, None], VAR_MAX)),
                                          0.0), axis=1).to(tl.float64)
                proj += tl.sum(c * c, axis=1).to(tl.float64)
                g = _gmm_mode_gain(ones, cm, lam, lam_perp, v, FULL_RANK, False)
                v_gc += tl.sum(tl.where(mode_ok[None, :], g * c * w, 0.0), axis=1)
                smask = row_ok[:, None] & mode_ok[None, :]
                tl.store(c_base + rows64[:, None] * (2 * R) + modes[None, :], c, mask=smask)
                tl.store(c_base + rows64[:, None] * (2 * R) + R + modes[None, :], w, mask=smask)
        logit = _gmm_logit(lw_ptr, k, q, quad, logdet, proj, lam_perp, s2_f64, D, R, FULL_RANK)
        m_run, alpha, shift = _online_update(m_run, logit)
        alpha = alpha.to(ACC)
        p = tl.exp(logit - shift).to(ACC)
        l_run = l_run * alpha + p
        pb = p * (cm * v_mf + cx * v_xf + v_gc)  # p beta, beta = v.(D_k - F)
        pcx = p * cx
        if HAS_BASES:
            tl.debug_barrier()  # the scratch was written in another thread layout
        # Pass 2: E0 = alpha E0 + p beta (D_k - F), E1 = alpha E1 + p (D_k - F), E2 = alpha E2 + p A_k v.
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            amask = row_ok[:, None] & d_ok[None, :]
            offs = rows64[:, None] * D + dd[None, :]
            mu = tl.load(means_ptr + k64 * D + dd, mask=d_ok, other=0.0).to(ACC)
            xt = _load_rows(x_ptr, rows, row_ok, d0, D, BLOCK_D, ACC)
            ft = _load_rows(f_ptr, rows, row_ok, d0, D, BLOCK_D, ACC)
            dev = cm[:, None] * (mu[None, :] - ft) + cx[:, None] * (xt - ft)
            e2 = tl.load(e2_base + offs, mask=amask, other=0.0) * alpha[:, None]
            if not FULL_RANK:
                e2 += pcx[:, None] * _load_rows(v_ptr, rows, row_ok, d0, D, BLOCK_D, ACC)
            if HAS_BASES:
                for r0 in range(0, R, BLOCK_R):
                    modes = r0 + tl.arange(0, BLOCK_R)
                    mode_ok = modes < R
                    smask = row_ok[:, None] & mode_ok[None, :]
                    c = tl.load(c_base + rows64[:, None] * (2 * R) + modes[None, :], mask=smask, other=0.0)
                    w = tl.load(c_base + rows64[:, None] * (2 * R) + R + modes[None, :], mask=smask, other=0.0)
                    lam = tl.load(eig_ptr + k64 * R + modes, mask=mode_ok, other=0.0).to(ACC)
                    v = tl.minimum(tl.maximum(lam[None, :] + s2[:, None], VAR_MIN), VAR_MAX)
                    g = _gmm_mode_gain(ones, cm, lam, lam_perp, v, FULL_RANK, False)
                    ut_t = tl.load(base_k + dd.to(tl.int64)[None, :] * R + modes[:, None],
                                   mask=mode_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
                    dev += tl.dot((g * c).to(ACC), ut_t, input_precision=PRECISION)
                    e2 += tl.dot((p[:, None] * g * w).to(ACC), ut_t, input_precision=PRECISION)
            tl.store(e2_base + offs, e2, mask=amask)
            e0 = tl.load(e0_base + offs, mask=amask, other=0.0) * alpha[:, None] + pb[:, None] * dev
            tl.store(e0_base + offs, e0, mask=amask)
            e1 = tl.load(e1_base + offs, mask=amask, other=0.0) * alpha[:, None] + p[:, None] * dev
            tl.store(e1_base + offs, e1, mask=amask)
        # The next component reloads these tiles (and rewrites the scratch), possibly in other threads.
        tl.debug_barrier()
    _store_shared_state(max_ptr, sum_ptr, m_run, l_run, pid_s, B, rows, row_ok, 3)


# ---------------------------------------------------------------------------------------------
# Launchers.

# Tiles and warps keyed by (float32, B > 16) as the forward's tables: (BLOCK_B, BLOCK_N, BLOCK_D, warps) for
# the training set, (BLOCK_B, BLOCK_D, warps) for the GMM (mode slices BLOCK_R <= 16: c and w = U^T v both
# live in registers). Chosen from ptxas register reports for sm_90 so that no precision mode spills (the
# forward's 64 x 64 training-set tile and 32-mode slices do, with the VJP's second dot product and
# accumulators); not yet tuned by timing on a GPU.
_DELTA_VJP_BLOCKS = {(True, True): (32, 32, 16, 8), (True, False): (16, 64, 16, 4),
                     (False, True): (16, 32, 16, 4), (False, False): (16, 32, 16, 4)}
_DELTA_VJP_EXACT_D_BLOCKS = (16, 32, 16, 4)  # float32 inputs with d <= EXACT_DIM: float64 tiles
_GMM_VJP_BLOCKS = {(True, True): (32, 16, 8), (True, False): (16, 32, 8),
                   (False, True): (16, 16, 8), (False, False): (16, 16, 8)}
_GMM_VJP_MAX_BLOCK_R = 16


def _finish(m, l, acc, v2, s2):
    """Merge the split states of the accumulator blocks [S, n_acc B, d] and apply the epilogue
    J^T v = E2 + (E0 - (v.E1) E1) / sigma^2 (E2 only when n_acc = 3)."""
    B = v2.shape[0]
    e = merge_states(m, l, acc, kernel=True).out
    v2 = v2 if v2.dtype == e.dtype else v2.to(e.dtype)
    jtv = torch.addcmul(e[:B], torch.linalg.vecdot(v2, e[B:2 * B]).unsqueeze(1), e[B:2 * B], value=-1)
    jtv /= s2.unsqueeze(1)
    return jtv + e[2 * B:] if e.shape[0] > 2 * B else jtv


def _state_buffers(S, n_acc, B, D, dt, dev):
    """Zeroed accumulators [S, n_acc B, D] and the row states m (float64 logits, as the forward's), l [S, n_acc B]."""
    return (torch.zeros((S, n_acc * B, D), dtype=dt, device=dev),
            torch.empty((S, n_acc * B), dtype=torch.float64, device=dev),
            torch.empty((S, n_acc * B), dtype=dt, device=dev))


def delta_mixture_vjp(x2: torch.Tensor, points: torch.Tensor, log_weights: torch.Tensor | None,
                      sigma: torch.Tensor, frame2: torch.Tensor, v2: torch.Tensor,
                      precision: str = "ieee", splits: int | None = None,
                      blocks: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """J^T v [B, d] (accumulation dtype) of the training-set denoiser at x2 [B, d] over points [N, d] (any
    float storage), about the frame frame2 [B, d] (the forward's denoiser); v2 [B, d]."""
    acc_dt = compute_dtype(x2, points, log_weights)
    x2, points, frame2, v2 = x2.contiguous(), points.contiguous(), frame2.contiguous(), v2.contiguous()
    B, D = x2.shape
    N = points.shape[0]
    dev = x2.device
    s2 = clamped_sigma_sq(sigma, B, acc_dt)
    lw = as_contiguous(log_weights, acc_dt) if log_weights is not None else s2
    key = ("delta_vjp", B, N, D, acc_dt, x2.dtype, points.dtype, frame2.dtype, v2.dtype, log_weights is not None,
           precision, splits, blocks, dev)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _remember(key, delta_plan(_delta_vjp_partial_kernel, (_DELTA_VJP_BLOCKS, _DELTA_VJP_EXACT_D_BLOCKS),
                                         x2, points, log_weights is not None, acc_dt, precision, splits, blocks, 2,
                                         lambda bn: (x2, points, lw, s2, frame2, v2, x2, s2.double(), s2, B, N, D, bn)))
    grid, S, n_per_split, consts = plan
    acc, m, l = _state_buffers(S, 2, B, D, acc_dt, dev)
    if B > 0:
        with device_guard(x2):
            _delta_vjp_partial_kernel[grid](x2, points, lw, s2, frame2, v2, acc, m, l, B, N, D, n_per_split,
                                            **consts)
    return _finish(m, l, acc, v2, s2)


def gmm_vjp(x2: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, bases: torch.Tensor | None,
            eigvals: torch.Tensor | None, lam_perp: torch.Tensor | None, sigma: torch.Tensor,
            frame2: torch.Tensor, v2: torch.Tensor, precision: str = "ieee", splits: int | None = None,
            blocks: tuple[int, int, int] | None = None, max_block_r: int = _GMM_VJP_MAX_BLOCK_R) -> torch.Tensor:
    """J^T v [B, d] (accumulation dtype) of the GMM denoiser at x2 [B, d] about the frame frame2 [B, d]."""
    acc_dt, x2, means, s2, bases_c, eig_c, lp_c, lw_c = gmm_operands(x2, log_weights, means, bases, eigvals, lam_perp,
                                                                     sigma)
    frame2, v2 = frame2.contiguous(), v2.contiguous()
    B, D = x2.shape
    K = means.shape[0]
    R = 0 if bases is None else bases.shape[2]
    dev = x2.device
    has_bases = R > 0
    key = ("gmm_vjp", B, K, D, R, acc_dt, x2.dtype, means.dtype, bases_c.dtype, frame2.dtype, v2.dtype,
           lam_perp is not None, precision, splits, blocks, max_block_r, dev)
    plan = _PLANS.get(key)
    if plan is None:
        bb, bd, warps = blocks or _GMM_VJP_BLOCKS[(acc_dt == torch.float32, B > 16)]
        block_r = max(16, min(max_block_r, 1 << (max(R, 1) - 1).bit_length()))  # next power of 2
        row_blocks = cdiv(B, bb)
        consts = dict(HAS_BASES=has_bases, HAS_LP=lam_perp is not None, FULL_RANK=R == D,
                      PRECISION=precision if acc_dt == torch.float32 else "ieee", ACC=_tl_dtype(acc_dt),
                      BLOCK_B=bb, BLOCK_D=bd, BLOCK_R=block_r, num_warps=warps)
        S = splits
        if S is None:
            S = split_count(_gmm_vjp_partial_kernel, dev, row_blocks, K, 3 * B * D,
                            (acc_dt, means.dtype, bases_c.dtype, frame2.dtype, v2.dtype, *consts.items()),
                            lambda: ((x2, means, bases_c, eig_c, lp_c, lw_c, s2, frame2, v2, x2, s2.double(), s2, x2,
                                      B, K, D, R, 16), consts),
                            WORKSPACE_ELEMENTS)
        k_per_split = cdiv(K, max(1, min(int(S), K)))
        plan = _remember(key, ((row_blocks, cdiv(K, k_per_split)), cdiv(K, k_per_split), k_per_split, consts))
    grid, S, k_per_split, consts = plan
    acc, m, l = _state_buffers(S, 3, B, D, acc_dt, dev)
    c_scratch = torch.empty((S, B, 2 * R), dtype=acc_dt, device=dev) if has_bases else m
    if B > 0:
        with device_guard(x2):
            _gmm_vjp_partial_kernel[grid](x2, means, bases_c, eig_c, lp_c, lw_c, s2, frame2, v2,
                                          acc, m, l, c_scratch, B, K, D, R, k_per_split, **consts)
    return _finish(m, l, acc, v2, s2)


def aot_cases(full: bool = False):
    """Launch configurations for gsa_kernels.triton_aot. full=False: both kernels in both accumulators (float32
    with half points, low-rank GMM with lam_perp, full-rank GMM); full=True: every tile-table entry, float32 in
    every precision mode, with the GMM variants that use the most registers."""
    def delta(dt, pts, prec, big, exact_d=False):
        bb, bn, bd, warps = _DELTA_VJP_EXACT_D_BLOCKS if exact_d else _DELTA_VJP_BLOCKS[(dt == "fp32", big)]
        ptrs = {n: "*" + dt for n in ("x_ptr", "lw_ptr", "s2_ptr", "f_ptr", "v_ptr", "acc_ptr", "sum_ptr")}
        return _delta_vjp_partial_kernel, {"pts_ptr": "*" + pts, **ptrs, "max_ptr": "*fp64",
                                           **dict.fromkeys(("B", "N", "D", "n_per_split"), "i32"),
                                           "HAS_LW": True, "PRECISION": prec,
                                           "ACC": tl.float32 if dt == "fp32" else tl.float64,
                                           "LOGIT": tl.float32 if dt == "fp32" and not exact_d else tl.float64,
                                           "BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_D": bd, "num_warps": warps}

    def gmm(dt, prec, big, full_rank):
        bb, bd, warps = _GMM_VJP_BLOCKS[(dt == "fp32", big)]
        names = ("x_ptr", "means_ptr", "bases_ptr", "eig_ptr", "lp_ptr", "lw_ptr", "s2_ptr", "f_ptr", "v_ptr",
                 "acc_ptr", "sum_ptr", "c_ptr")
        return _gmm_vjp_partial_kernel, {**{n: "*" + dt for n in names}, "max_ptr": "*fp64",
                                         **dict.fromkeys(("B", "K", "D", "R", "k_per_split"), "i32"),
                                         "HAS_BASES": True, "HAS_LP": not full_rank, "FULL_RANK": full_rank,
                                         "PRECISION": prec, "ACC": tl.float32 if dt == "fp32" else tl.float64,
                                         "BLOCK_B": bb, "BLOCK_D": bd, "BLOCK_R": _GMM_VJP_MAX_BLOCK_R,
                                         "num_warps": warps}

    if not full:
        yield delta("fp32", "fp32", "ieee", True)
        yield delta("fp32", "bf16", "tf32x3", False)
        yield delta("fp64", "fp64", "ieee", True)
        yield delta("fp32", "fp32", "ieee", True, exact_d=True)
        yield gmm("fp32", "tf32x3", True, False)
        yield gmm("fp32", "ieee", False, True)
        yield gmm("fp64", "ieee", True, False)
        return
    for variant in aot_delta_variants(_DELTA_VJP_BLOCKS):
        yield delta(*variant)
    for is_f32, big in _GMM_VJP_BLOCKS:
        for prec in AOT_PRECISIONS if is_f32 else ("ieee",):
            for full_rank in (False, True):
                yield gmm("fp32" if is_f32 else "fp64", prec, big, full_rank)
