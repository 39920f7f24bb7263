"""Triton kernels of the mixture ops (docs/math.md section 3): streaming log-sum-exp over points/components.

(Above 400 lines on purpose: the two kernels share their device helpers, tile tables and the numerics
notes below; split apart, a kernel would lose the notes its clamps depend on.)

Two kernels, both "split-K over components + online softmax" (flash-decoding style):

* ``_delta_partial_kernel`` (training set, N up to millions). A program owns a tile of BLOCK_B query rows
  and a contiguous range of points (its split). For each chunk of BLOCK_N points it
    1. loops over d in BLOCK_D slices and, in the chunk's own frame c (the mean of its points, formed
       slice by slice from the tile already in registers), accumulates dots = (x - c)(x_i - c)^T with
       ``tl.dot`` (input_precision = ieee / tf32x3 / tf32), the point norms ||x_i - c||^2 and, in
       float64 from exact differences, the row term ||x - c||^2,
    2. forms logits log pi_i - ||x - x_i||^2 / (2 sigma^2) as a float64 row term plus float32 relative
       terms, updates the float64 running max m, the index of its point and the rescaled sum l (online
       softmax; p = exp(logit - m)),
    3. loops over d again and updates acc[BLOCK_B, d] = alpha acc + p (x_i - ctr) with a second ``tl.dot``.
  At the end the split's max is replaced by its dominant logit recomputed from float64 differences x - x_*.
  Why this design: d is large (3072 at CIFAR size), so acc[BLOCK_B, d] cannot live in registers as in
  flash attention (head dim <= 256). It lives in a float32 workspace [S, B, d] in global memory and is
  read-modified-written once per chunk (2 BLOCK_B d floats per BLOCK_N points: about twice the point
  traffic at 64 x 64 tiles, largely from L2), with a barrier per chunk because the tiles may be reloaded
  by other threads. The alternatives cost more: a two-pass softmax (pass 1: row max/sum; pass 2: weighted
  sum) recomputes the dots (3 B N d multiply-adds instead of 2) and a grid over d-slices of acc
  recomputes the dots once per slice; storing the logits [B, N] breaks the memory bound. Logits are never
  stored. The points are read once per row tile; splitting them over S programs per row tile keeps the GPU
  busy for small B, and one small kernel merges the S partial states exactly and adds the op's epilogue
  (gsa_kernels._core.lse.merge_mixture). Extra memory:
  S B d + 2 S B numbers (the maxima float64), with S <= ~2 programs per SM and S B d <= 2^25 (128 MiB).

* ``_gmm_partial_kernel`` (GMM, K components, optional rank-r bases). A program streams over its range of
  components one at a time: pass 1 computes q = ||x - mu_k||^2 from the exact float64 differences (no
  distance expansion at all: B d per component, small next to the B d r of c = U_k^T (x - mu_k)) and the
  logit as a float64 number per row, then c in slices of BLOCK_R <= 32
  modes with ``tl.dot`` (any rank; c goes to a [S, B, r] scratch); pass 2 over d adds
  p cm_k (mu_k - ctr) + U_k (p g_k c_k) to the workspace accumulator and p cx_k to a per-row sum, with
  the coefficients of D_k - ctr (or of the score term) rearranged so that none is a difference of
  nearly equal numbers: the denoiser is never formed as x + (D - x) (cancels at large sigma), nor the
  score as (D - x) / sigma^2 (cancels at small sigma). Optionally the logits are stored [B, K] for the
  posterior weights. With bases, each split tracks its best component and at its end recomputes that
  logit in float64 (c_* = U_*^T (x - mu_*) from exact differences: O(B d r) per split, no memory in K); the
  split's max becomes that exact logit and its stored logits move with it.

Numerics (docs/math.md sections 3.1 and 3.2): no float32 number in a logit carries ||x - ctr||^2. The
training-set kernel's float32 GEMM loses eps ||x - c|| ||x_i - c|| in the chunk's frame c (float64 for
d <= EXACT_DIM), the row term ||x - c||^2 is exact; the GMM kernel's q is exact and its float32 c_k
(rounding eps ||c_k||^2 / (lam_perp + sigma^2)) reaches log p only through the non-dominant components.
A far query therefore keeps the float64 posterior, and log p the float64 value of its dominant term. The
accumulators stay centred on ``ctr`` (the mean of the points): the score's differences mu_i - x are formed
as (mu_i - ctr) - (x - ctr), so their cancellation is relative to the spread of the data, not to ||x||.
Relative quadratic forms are clamped to 1e37 (float64 ones to 1e300) and sigma^2 to [FLT_MIN, FLT_MAX], and
the online update guards the all -inf state, so finite input never yields inf/NaN. The accumulation dtype ACC is
float32 (any storage type of x/points; half points halve the traffic) or float64 (float64 inputs;
``tl.dot`` then runs in float64, "ieee").

Everything here also runs under TRITON_INTERPRET=1 on CPU tensors (CI); the interpreter ignores
input_precision, so TF32 errors are only seen on a GPU. gsa_kernels.triton_aot compiles the
launch configurations for sm_90 without a GPU (no register spills at the chosen tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.cache import as_contiguous, workspaces
from .._core.dtypes import compute_dtype
from .._core.launch import LaunchPlans, cdiv, device_guard, split_count
from .._core.triton_lse import merge  # the Triton kernel of _core.lse.merge_mixture

FLT_MIN = torch.finfo(torch.float32).tiny
FLT_MAX = torch.finfo(torch.float32).max
WORKSPACE_ELEMENTS = 1 << 25
EXACT_DIM = 16  # up to this d the training-set kernel's cross terms are float64 (docs/math.md section 3.2)
# Constants visible inside the kernels (compiled Triton only reads constexpr globals).
QUAD_MAX = tl.constexpr(1e37)  # quadratic forms beyond this only tie with each other
QUAD_MAX_F64 = tl.constexpr(1e300)  # the same for float64 logits: clamp only what would overflow
VAR_MIN = tl.constexpr(FLT_MIN)
VAR_MAX = tl.constexpr(FLT_MAX)


@triton.jit
def _load_rows(ptr, idx, idx_ok, d0, D, BLOCK_D: tl.constexpr):
    """([len(idx), BLOCK_D] tile of rows idx of a row-major [*, D] matrix in its storage type, zero outside;
    the tile's mask)."""
    dd = d0 + tl.arange(0, BLOCK_D)
    mask = idx_ok[:, None] & (dd < D)[None, :]
    return tl.load(ptr + idx.to(tl.int64)[:, None] * D + dd[None, :], mask=mask, other=0.0), mask


@triton.jit
def _load_centred(ptr, ctr_ptr, idx, idx_ok, d0, D, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """[len(idx), BLOCK_D] tile of rows idx of a row-major [*, D] matrix minus ctr, zero outside."""
    v, mask = _load_rows(ptr, idx, idx_ok, d0, D, BLOCK_D)
    dd = d0 + tl.arange(0, BLOCK_D)
    c = tl.load(ctr_ptr + dd, mask=dd < D, other=0.0).to(ACC)
    return tl.where(mask, v.to(ACC) - c[None, :], 0.0)


@triton.jit
def _log1p(z):
    """log(1 + z) for z >= 0 without losing z < eps (Kahan: log(u) z / (u - 1) with u = 1 + z)."""
    u = 1.0 + z
    exact = u == 1.0
    return tl.where(exact, z, tl.log(u) * (z / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _online_update(m_run, logit):
    """One step of the online softmax: (m_new, alpha = e^{m_run - m_new}, shift) with the all -inf
    state kept NaN-free (shift = 0 there, so alpha = e^{-inf} = 0 and p = e^{-inf} = 0)."""
    m_new = tl.maximum(m_run, logit)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp(m_run - shift), shift


@triton.jit
def _chunk_columns(n0, n_hi, BLOCK_N: tl.constexpr, LOGIT: tl.constexpr):
    """(columns, their mask, 1 / their count) of the chunk of points starting at n0."""
    cols = n0 + tl.arange(0, BLOCK_N)
    # (A float32 reciprocal: the frame need not be the exact mean, and a float64 division is a call.)
    inv_count = (1.0 / tl.minimum(n_hi - n0, BLOCK_N).to(tl.float32)).to(LOGIT)
    return cols, cols < n_hi, inv_count


@triton.jit
def _chunk_frame_slice(pts_ptr, cols, col_ok, d0, D, inv_count, BLOCK_D: tl.constexpr, LOGIT: tl.constexpr):
    """(x_i - c [BLOCK_N, BLOCK_D], c [BLOCK_D]) of one d slice of a chunk in its own frame c (the mean of its
    points, formed from the tile in registers), in LOGIT."""
    pt, pmask = _load_rows(pts_ptr, cols, col_ok, d0, D, BLOCK_D)
    pt = pt.to(LOGIT)
    frame = tl.sum(pt, axis=0) * inv_count
    return tl.where(pmask, pt - frame[None, :], 0.0), frame


@triton.jit
def _chunk_logits(x_ptr, pts_ptr, lw_ptr, v_ptr, f_ptr, rows, row_ok, cols, col_ok, inv_count, half_inv_s2, D,
                  HAS_LW: tl.constexpr, WITH_V: tl.constexpr, PRECISION: tl.constexpr, LOGIT: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The logits of one chunk of points in its own frame c (docs/math.md section 3.2): (row [BLOCK_B] float64,
    rel [BLOCK_B, BLOCK_N] LOGIT) with logit_i = lw_i - ||x - x_i||^2 / (2 s^2) = row + rel_i, and with WITH_V
    also v.(x_i - c) [BLOCK_B, BLOCK_N] and v.(c - F) [BLOCK_B] (LOGIT) from the same tiles."""
    # 1. One d slice at a time: dots (x - c)(x_i - c)^T, point norms ||x_i - c||^2 and, exactly in float64,
    #    the row term ||x - c||^2.
    dots = tl.zeros((BLOCK_B, BLOCK_N), LOGIT)
    pnorm = tl.zeros((BLOCK_N,), LOGIT)
    row_sq = tl.zeros((BLOCK_B,), tl.float64)
    v_pts = tl.zeros((BLOCK_B, BLOCK_N), LOGIT)
    v_cf = tl.zeros((BLOCK_B,), LOGIT)
    for d0 in range(0, D, BLOCK_D):
        xt, xmask = _load_rows(x_ptr, rows, row_ok, d0, D, BLOCK_D)
        pk, frame = _chunk_frame_slice(pts_ptr, cols, col_ok, d0, D, inv_count, BLOCK_D, LOGIT)
        xk = tl.where(xmask, xt.to(LOGIT) - frame[None, :], 0.0)
        dots += tl.dot(xk, tl.trans(pk), input_precision=PRECISION)
        pnorm += tl.sum(pk * pk, axis=1)
        xd = tl.where(xmask, xt.to(tl.float64) - frame.to(tl.float64)[None, :], 0.0)
        row_sq += tl.sum(xd * xd, axis=1)
        if WITH_V:
            vt, _ = _load_rows(v_ptr, rows, row_ok, d0, D, BLOCK_D)
            ft, _ = _load_rows(f_ptr, rows, row_ok, d0, D, BLOCK_D)
            vt = vt.to(LOGIT)
            v_pts += tl.dot(vt, tl.trans(pk), input_precision=PRECISION)
            v_cf += tl.sum(tl.where(xmask, vt * (frame[None, :] - ft.to(LOGIT)), 0.0), axis=1)
    # 2. rel_i = lw_i - (||x_i - c||^2 - 2 (x - c).(x_i - c)) / (2 s^2) in LOGIT, the row part in float64.
    rel = (2.0 * dots - pnorm[None, :]) * half_inv_s2.to(LOGIT)[:, None]
    rel = tl.where(rel == rel, tl.minimum(tl.maximum(rel, -QUAD_MAX), QUAD_MAX), -QUAD_MAX)
    if HAS_LW:
        rel += tl.load(lw_ptr + cols, mask=col_ok, other=0.0).to(LOGIT)[None, :]
    rel = tl.where(col_ok[None, :], rel, float("-inf"))
    return -row_sq * half_inv_s2, rel, v_pts, v_cf


@triton.jit
def _chunk_softmax(row, rel, n0, m_run, arg_run, LOGIT: tl.constexpr):
    """The online softmax over one chunk's logits row + rel: (m_run, arg_run (the index of the running max's
    point), alpha, p [BLOCK_B, BLOCK_N] in LOGIT) with the float64 running max."""
    chunk_max = row + tl.max(rel, axis=1).to(tl.float64)
    arg_run = tl.where(chunk_max > m_run, n0 + tl.argmax(rel, axis=1), arg_run)
    m_run, alpha, shift = _online_update(m_run, chunk_max)
    # row - shift <= -rel_i wherever rel_i is finite; the clamp keeps a masked (-inf) rel from meeting +inf.
    return m_run, arg_run, alpha, tl.exp(tl.minimum(row - shift, QUAD_MAX).to(LOGIT)[:, None] + rel)


@triton.jit
def _exact_dominant_logit(x_ptr, pts_ptr, lw_ptr, rows, row_ok, m_run, arg_run, half_inv_s2, D,
                          HAS_LW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The split's max replaced by its dominant logit recomputed exactly (x - x_* in float64): the state's log W
    is then l_* + log sum_i exp(l~_i - l~_*) (docs/math.md section 3.2)."""
    found = row_ok & (arg_run >= 0)
    top = tl.where(found, arg_run, 0)
    dist2 = tl.zeros((BLOCK_B,), tl.float64)
    for d0 in range(0, D, BLOCK_D):
        xt, xmask = _load_rows(x_ptr, rows, found, d0, D, BLOCK_D)
        pt, _ = _load_rows(pts_ptr, top, found, d0, D, BLOCK_D)
        xd = xt.to(tl.float64) - pt.to(tl.float64)
        dist2 += tl.sum(xd * xd, axis=1)
    exact = -dist2 * half_inv_s2
    if HAS_LW:
        exact += tl.load(lw_ptr + top, mask=found, other=0.0).to(tl.float64)
    return tl.where(found, exact, m_run)


@triton.jit
def _delta_split_start(s2_ptr, B, N, n_per_split, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """A training-set program's split, rows, 1 / (2 s^2) (float64: scales the exact row terms), its range of
    points and the empty online-softmax state (float64 max, index of its point, sum)."""
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    half_inv_s2 = 0.5 / tl.load(s2_ptr + rows, mask=row_ok, other=1.0).to(tl.float64)
    n_lo = pid_s * n_per_split
    return (pid_s, rows, row_ok, half_inv_s2, n_lo, tl.minimum(n_lo + n_per_split, N),
            tl.full((BLOCK_B,), float("-inf"), tl.float64), tl.full((BLOCK_B,), -1, tl.int32),
            tl.zeros((BLOCK_B,), ACC))


@triton.jit
def _delta_partial_kernel(
    x_ptr, pts_ptr, lw_ptr, ctr_ptr, s2_ptr, acc_ptr, max_ptr, sum_ptr,
    B, N, D, n_per_split,
    HAS_LW: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, LOGIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_s, rows, row_ok, half_inv_s2, n_lo, n_hi, m_run, arg_run, l_run = _delta_split_start(
        s2_ptr, B, N, n_per_split, ACC, BLOCK_B)
    acc_base = acc_ptr + (pid_s * B).to(tl.int64) * D
    rows64 = rows.to(tl.int64)  # B d may exceed 2^31 elements
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols, col_ok, inv_count = _chunk_columns(n0, n_hi, BLOCK_N, LOGIT)
        row, rel, _, _ = _chunk_logits(x_ptr, pts_ptr, lw_ptr, x_ptr, x_ptr, rows, row_ok, cols, col_ok, inv_count,
                                       half_inv_s2, D, HAS_LW, False, PRECISION, LOGIT, BLOCK_B, BLOCK_N, BLOCK_D)
        m_run, arg_run, alpha, p = _chunk_softmax(row, rel, n0, m_run, arg_run, LOGIT)
        alpha = alpha.to(ACC)
        p = p.to(ACC)
        l_run = l_run * alpha + tl.sum(p, axis=1)
        # 3. acc = alpha acc + p (x_i - ctr), one d slice at a time.
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            amask = row_ok[:, None] & (dd < D)[None, :]
            a_ptrs = acc_base + rows64[:, None] * D + dd[None, :]
            pt = _load_centred(pts_ptr, ctr_ptr, cols, col_ok, d0, D, BLOCK_D, ACC)
            acc = tl.load(a_ptrs, mask=amask, other=0.0) * alpha[:, None]
            acc += tl.dot(p, pt, input_precision=PRECISION)
            tl.store(a_ptrs, acc, mask=amask)
        # The next chunk reloads these acc tiles, possibly in another thread layout: order the accesses.
        tl.debug_barrier()
    m_run = _exact_dominant_logit(x_ptr, pts_ptr, lw_ptr, rows, row_ok, m_run, arg_run, half_inv_s2, D, HAS_LW,
                                  BLOCK_B, BLOCK_D)
    tl.store(max_ptr + pid_s * B + rows, m_run, mask=row_ok)
    tl.store(sum_ptr + pid_s * B + rows, l_run, mask=row_ok)


@triton.jit
def _gmm_mode_gain(p, cm, lam, lam_perp, v, FULL_RANK: tl.constexpr, SCORE: tl.constexpr):
    """p g_k per mode: the coefficient of U_k c_k in D_k - ctr (or in the score term), [BLOCK_B, BLOCK_R]."""
    if FULL_RANK:
        if SCORE:
            g = -p[:, None] / v
        else:
            g = p[:, None] * lam[None, :] / v
    else:
        g = (p * cm)[:, None] * (lam[None, :] - lam_perp) / v
    return g


@triton.jit
def _gmm_logit(lw_ptr, k, q, quad, logdet, proj, lam_perp, s2_f64, D, R, FULL_RANK: tl.constexpr):
    """Component k's float64 logit per row from q = ||x - mu_k||^2, the modes' sums of c^2 / v (quad),
    log1p(lam / s^2) (logdet) and c^2 (proj), all float64, and the complement's terms (docs/math.md 3.2)."""
    if not FULL_RANK:
        lp_f64 = tl.zeros_like(q) + lam_perp  # lam_perp is float32-exact
        vp_f64 = tl.minimum(tl.maximum(lp_f64 + s2_f64, VAR_MIN), VAR_MAX)
        quad += tl.maximum(q - proj, 0.0) / vp_f64
        logdet += (D - R) * _log1p(tl.minimum(lp_f64 / s2_f64, VAR_MAX))
    return tl.load(lw_ptr + k).to(tl.float64) - 0.5 * (tl.minimum(quad, QUAD_MAX_F64) + logdet)


@triton.jit
def _gmm_mode_terms(c, lam, s2, mode_ok):
    """Per row, over one slice of modes: (sum c^2 / v, sum log(1 + lam / s^2), sum c^2) in float64, with
    v = lam + s^2 clamped; c [BLOCK_B, BLOCK_R], lam and mode_ok [1 | BLOCK_B, BLOCK_R], s2 [BLOCK_B]."""
    v = tl.minimum(tl.maximum(lam + s2[:, None], VAR_MIN), VAR_MAX)
    quad = tl.sum(tl.where(mode_ok, c * c / v, 0.0), axis=1).to(tl.float64)
    logdet = tl.sum(tl.where(mode_ok, _log1p(tl.minimum(lam / s2[:, None], VAR_MAX)), 0.0), axis=1).to(tl.float64)
    return quad, logdet, tl.sum(c * c, axis=1).to(tl.float64)


@triton.jit
def _gmm_exact_logit(x_rows, means_ptr, bases_ptr, eig_ptr, lp_ptr, lw_ptr, top, found, s2, D, R,
                     HAS_LP: tl.constexpr, FULL_RANK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The logit of component top[b] of each row b (where found) with no float32 rounding: x - mu in float64
    (exact for float32 numbers), q = ||x - mu||^2 and c = U^T (x - mu) summed in float64 (docs/math.md
    section 3.2, step 5). O(d (1 + r)) per row in float64 FMAs (c is a matrix-vector product per row, so no
    tensor cores); each row reads its own basis U_* once. Tiles are [BLOCK_B, 1024 / BLOCK_B] (4 numbers
    per thread at 8 warps: a wider tile, or a [rows, d, modes] one, spills next to the streaming loop)."""
    BLOCK_E: tl.constexpr = 1024 // BLOCK_B
    top64 = top.to(tl.int64)
    q = tl.zeros((BLOCK_B,), tl.float64)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = found[:, None] & (dd < D)[None, :]
        xc = (tl.load(x_rows + dd[None, :], mask=mask, other=0.0).to(tl.float64)
              - tl.load(means_ptr + top64[:, None] * D + dd[None, :], mask=mask, other=0.0).to(tl.float64))
        q += tl.sum(xc * xc, axis=1)
    quad = tl.zeros((BLOCK_B,), tl.float64)
    logdet = tl.zeros((BLOCK_B,), tl.float64)
    proj = tl.zeros((BLOCK_B,), tl.float64)
    base_top = bases_ptr + top64 * D * R
    cols = tl.arange(0, BLOCK_E)
    for r0 in range(0, R, BLOCK_E):
        # c of modes r0 + cols, one mode at a time per d tile: the gathered basis rows are strided by r, so
        # the modes of a tile reuse the same cache sectors; c_i lands in column i - r0 of a tile with the
        # layout of x - mu (no layout conversion).
        c = tl.zeros((BLOCK_B, BLOCK_E), tl.float64)
        for d0 in range(0, D, BLOCK_E):
            de = d0 + cols
            mask = found[:, None] & (de < D)[None, :]
            xc = (tl.load(x_rows + de[None, :], mask=mask, other=0.0).to(tl.float64)
                  - tl.load(means_ptr + top64[:, None] * D + de[None, :], mask=mask, other=0.0).to(tl.float64))
            u_ptrs = base_top[:, None] + de.to(tl.int64)[None, :] * R
            for i in range(r0, tl.minimum(r0 + BLOCK_E, R)):
                c_i = tl.sum(xc * tl.load(u_ptrs + i, mask=mask, other=0.0).to(tl.float64), axis=1)
                c += tl.where(cols[None, :] == i - r0, c_i[:, None], 0.0)
        modes = r0 + cols
        mode_ok = found[:, None] & (modes < R)[None, :]
        lam = tl.load(eig_ptr + top64[:, None] * R + modes[None, :], mask=mode_ok, other=0.0).to(tl.float64)
        quad_r, logdet_r, proj_r = _gmm_mode_terms(c, lam, s2, mode_ok)
        quad += quad_r
        logdet += logdet_r
        proj += proj_r
    if HAS_LP:
        lam_perp = tl.load(lp_ptr + top64, mask=found, other=0.0).to(tl.float64)
    else:
        lam_perp = 0.0
    return _gmm_logit(lw_ptr, top64, q, quad, logdet, proj, lam_perp, s2, D, R, FULL_RANK)


@triton.jit
def _gmm_row_tile(s2_ptr, B, BLOCK_B: tl.constexpr, ACC: tl.constexpr):
    """The GMM kernels' row tile (grid axis 0) with its sigma^2, in ACC and in float64."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    s2 = tl.load(s2_ptr + rows, mask=row_ok, other=1.0).to(ACC)
    return rows, row_ok, s2, s2.to(tl.float64)


@triton.jit
def _gmm_partial_kernel(
    x_ptr, means_ptr, bases_ptr, eig_ptr, lp_ptr, lw_ptr, ctr_ptr, s2_ptr,
    acc_ptr, max_ptr, sum_ptr, xsum_ptr, logit_ptr, c_ptr,
    B, K, D, R, k_per_split,
    HAS_BASES: tl.constexpr, HAS_LP: tl.constexpr, FULL_RANK: tl.constexpr, STORE_LOGITS: tl.constexpr,
    SCORE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_s = tl.program_id(1)
    rows, row_ok, s2, s2_f64 = _gmm_row_tile(s2_ptr, B, BLOCK_B, ACC)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    m_run = tl.full((BLOCK_B,), float("-inf"), tl.float64)
    arg_run = tl.full((BLOCK_B,), -1, tl.int32)  # the component holding m_run
    l_run = tl.zeros((BLOCK_B,), ACC)
    x_run = tl.zeros((BLOCK_B,), ACC)
    acc_base = acc_ptr + (pid_s * B).to(tl.int64) * D
    c_base = c_ptr + (pid_s * B).to(tl.int64) * R  # this split's c = U_k^T (x - mu_k) scratch [B, R]
    rows64 = rows.to(tl.int64)  # B d may exceed 2^31 elements
    x_rows = x_ptr + rows64[:, None] * D
    for k in range(k_lo, k_hi):
        k64 = tl.cast(k, tl.int64)
        base_k = bases_ptr + k64 * D * R
        # Pass 1a: q = ||x - mu_k||^2 from the exact float64 differences, summed in float64: the per-row
        # distance never rounds away the differences between components (docs/math.md section 3.2).
        q = tl.zeros((BLOCK_B,), tl.float64)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            xt = tl.load(x_rows + dd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                         other=0.0).to(tl.float64)
            mu = tl.load(means_ptr + k64 * D + dd, mask=d_ok, other=0.0).to(tl.float64)
            xc = tl.where(row_ok[:, None] & d_ok[None, :], xt - mu[None, :], 0.0)
            q += tl.sum(xc * xc, axis=1)
        # log N_k (docs/math.md section 3) with clamped variances (s2 is clamped to [FLT_MIN, FLT_MAX] by the launcher);
        # log det C_k(sigma) is taken relative to sigma^2 I (log1p(lam / s^2)), so the logits stay O(1) at
        # large sigma; the row constant -d/2 log(2 pi sigma^2) is added in the epilogue. The logit is a float64
        # number per row; the per-mode terms (float32 c from a GEMM) are summed in ACC.
        if HAS_LP:
            lam_perp = tl.load(lp_ptr + k).to(ACC)
        else:
            lam_perp = 0.0
        v_perp = tl.minimum(tl.maximum(lam_perp + s2, VAR_MIN), VAR_MAX)
        quad = tl.zeros((BLOCK_B,), tl.float64)
        logdet = tl.zeros((BLOCK_B,), tl.float64)
        proj = tl.zeros((BLOCK_B,), tl.float64)
        if HAS_BASES:
            # Pass 1b: c = U_k^T (x - mu_k) one BLOCK_R slice of modes at a time (any rank r), kept in the
            # scratch for pass 2.
            for r0 in range(0, R, BLOCK_R):
                modes = r0 + tl.arange(0, BLOCK_R)
                mode_ok = modes < R
                c = tl.zeros((BLOCK_B, BLOCK_R), ACC)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    d_ok = dd < D
                    xt = tl.load(x_rows + dd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                                 other=0.0).to(ACC)
                    mu = tl.load(means_ptr + k64 * D + dd, mask=d_ok, other=0.0).to(ACC)
                    xc = tl.where(row_ok[:, None] & d_ok[None, :], xt - mu[None, :], 0.0)
                    ut = tl.load(base_k + dd.to(tl.int64)[:, None] * R + modes[None, :],
                                 mask=d_ok[:, None] & mode_ok[None, :], other=0.0).to(ACC)
                    c += tl.dot(xc, ut, input_precision=PRECISION)
                lam = tl.load(eig_ptr + k64 * R + modes, mask=mode_ok, other=0.0).to(ACC)
                quad_r, logdet_r, proj_r = _gmm_mode_terms(c, lam[None, :], s2, mode_ok[None, :])
                quad += quad_r
                logdet += logdet_r
                proj += proj_r
                tl.store(c_base + rows64[:, None] * R + modes[None, :], c, mask=row_ok[:, None] & mode_ok[None, :])
        logit = _gmm_logit(lw_ptr, k, q, quad, logdet, proj, lam_perp, s2_f64, D, R, FULL_RANK)
        if STORE_LOGITS:
            tl.store(logit_ptr + rows64 * K + k, logit, mask=row_ok)
        arg_run = tl.where(logit > m_run, k, arg_run)
        m_run, alpha, shift = _online_update(m_run, logit)
        alpha = alpha.to(ACC)
        p = tl.exp(logit - shift).to(ACC)
        l_run = l_run * alpha + p
        # Component k adds p [cm (mu_k - ctr) + cx (x - ctr) + U_k (g c)] with the coefficients of
        # D_k - ctr or of the score term, formed without cancellation (vp = lam_perp + s^2, v = lam + s^2):
        #   denoiser: cm = s^2/vp, cx = lam_perp/vp, g = s^2 (lam - lam_perp)/(v vp)   (1 - a, a, b - a)
        #   score:    cm = 1/vp,   cx = -1/vp,       g = (lam - lam_perp)/(v vp)         (the same / s^2)
        #   r = d:    cm = 1 | 0,  cx = 0,           g = lam/v | -1/v                    (no complement)
        if FULL_RANK:
            cx = tl.zeros((BLOCK_B,), ACC)
            if SCORE:
                cm = cx
            else:
                cm = cx + 1.0
        else:
            if SCORE:
                cm = 1.0 / v_perp
                cx = -cm
            else:
                cm = s2 / v_perp
                cx = lam_perp / v_perp
        pm = p * cm
        x_run = x_run * alpha + p * cx
        if HAS_BASES:
            tl.debug_barrier()  # the scratch c was written in another thread layout
        # Pass 2: acc = alpha acc + p cm (mu_k - ctr) + sum over mode slices U_k (p g c).
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            amask = row_ok[:, None] & d_ok[None, :]
            a_ptrs = acc_base + rows64[:, None] * D + dd[None, :]
            acc = tl.load(a_ptrs, mask=amask, other=0.0) * alpha[:, None]
            if not (FULL_RANK and SCORE):
                mu_c = (tl.load(means_ptr + k64 * D + dd, mask=d_ok, other=0.0).to(ACC)
                        - tl.load(ctr_ptr + dd, mask=d_ok, other=0.0).to(ACC))
                acc += pm[:, None] * mu_c[None, :]
            if HAS_BASES:
                for r0 in range(0, R, BLOCK_R):
                    modes = r0 + tl.arange(0, BLOCK_R)
                    mode_ok = modes < R
                    c = tl.load(c_base + rows64[:, None] * R + modes[None, :], mask=row_ok[:, None] & mode_ok[None, :],
                                other=0.0)
                    lam = tl.load(eig_ptr + k64 * R + modes, mask=mode_ok, other=0.0).to(ACC)
                    v = tl.minimum(tl.maximum(lam[None, :] + s2[:, None], VAR_MIN), VAR_MAX)
                    g = _gmm_mode_gain(p, cm, lam, lam_perp, v, FULL_RANK, SCORE) * c
                    ut_t = tl.load(base_k + dd.to(tl.int64)[None, :] * R + modes[:, None],
                                   mask=mode_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
                    acc += tl.dot(g.to(ACC), ut_t, input_precision=PRECISION)
            tl.store(a_ptrs, acc, mask=amask)
        # The next component reloads these acc tiles (and rewrites the scratch), possibly in other threads.
        tl.debug_barrier()
    if HAS_BASES:
        # The split's max becomes its dominant logit recomputed without float32 rounding (the float32 c_k
        # leaves eps ||c_k||^2 / (lam_perp + s^2) in the streamed ones; r = 0 logits are exact already):
        # the state's log W is then l_* + log sum_k exp(l~_k - l~_*) (docs/math.md section 3.2).
        found = row_ok & (arg_run >= 0)
        exact = _gmm_exact_logit(x_rows, means_ptr, bases_ptr, eig_ptr, lp_ptr, lw_ptr, tl.where(found, arg_run, 0),
                                 found, s2_f64, D, R, HAS_LP, FULL_RANK, BLOCK_B, BLOCK_D)
        if STORE_LOGITS:
            # The split's stored logits move with its max, so the weights exp(logit - M) / W still sum to 1.
            shift_by = tl.where(found, exact - m_run, 0.0)
            tl.debug_barrier()  # the logits were stored in another thread layout
            for k in range(k_lo, k_hi):
                l_ptrs = logit_ptr + rows64 * K + k
                tl.store(l_ptrs, tl.load(l_ptrs, mask=row_ok, other=0.0) + shift_by, mask=row_ok)
        m_run = tl.where(found, exact, m_run)
    tl.store(max_ptr + pid_s * B + rows, m_run, mask=row_ok)
    tl.store(sum_ptr + pid_s * B + rows, l_run, mask=row_ok)
    tl.store(xsum_ptr + pid_s * B + rows, x_run, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Launchers.
def _tl_dtype(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


# Tiles and warps keyed by (float32, B > 16): (BLOCK_B, BLOCK_N, BLOCK_D, warps) for the delta kernel
# (float64 inputs take the float64 entries, float32 inputs with d <= EXACT_DIM _DELTA_EXACT_D_BLOCKS),
# (BLOCK_B, BLOCK_D, warps) for the GMM kernel (whose mode slices are BLOCK_R <= 32 wide). Chosen from
# ptxas register reports for sm_90 so that no mode spills (float32: ieee, tf32x3, tf32); not yet tuned
# by timing on a GPU.
_DELTA_BLOCKS = {(True, True): (64, 64, 16, 8), (True, False): (16, 64, 16, 4),
                 (False, True): (16, 32, 16, 8), (False, False): (16, 32, 16, 8)}
_DELTA_EXACT_D_BLOCKS = (16, 32, 16, 4)
_GMM_BLOCKS = {(True, True): (32, 16, 8), (True, False): (16, 32, 8),
               (False, True): (16, 16, 8), (False, False): (16, 16, 8)}
_GMM_MAX_BLOCK_R = 32


def clamped_sigma_sq(sigma: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """sigma^2 clamped to [FLT_MIN, FLT_MAX] as a contiguous [batch] vector: two ops (a scalar or [1] sigma
    is expanded first, a view: the product writes the dense vector)."""
    s = sigma if sigma.dtype == dtype else sigma.to(dtype)
    if s.dim() != 1 or s.shape[0] != batch:
        s = s.expand(batch)
    return (s * s).clamp_(FLT_MIN, FLT_MAX)


# Launch plans of both launchers (grid, split, constants per call signature).
_PLANS = LaunchPlans()
_remember = _PLANS.remember


def delta_plan(kernel, tile_tables, x2, points, has_lw, acc_dt, precision, splits, blocks, n_acc, sample_args):
    """(grid, S, n_per_split, constexprs) of one launch of a training-set kernel (the forward, or the VJP with
    n_acc accumulators of [B, d]): tiles from tile_tables = (entries keyed by (float32, B > 16), the low-d entry),
    sample_args(BLOCK_N) the arguments of a sample launch for the split count."""
    B, D = x2.shape
    N = points.shape[0]
    exact_d = acc_dt == torch.float32 and D <= EXACT_DIM  # the chunk's cross terms in float64
    logit_dt = torch.float64 if exact_d else acc_dt
    if blocks is None:
        blocks = tile_tables[1] if exact_d else tile_tables[0][(acc_dt == torch.float32, B > 16)]
    bb, bn, bd, warps = blocks
    row_blocks = cdiv(B, bb)
    n_chunks = cdiv(N, bn)
    prec = precision if logit_dt == torch.float32 else "ieee"  # (float64 tiles: TF32 does not apply)
    consts = dict(HAS_LW=has_lw, PRECISION=prec, ACC=_tl_dtype(acc_dt), LOGIT=_tl_dtype(logit_dt),
                  BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)
    if splits is None:
        splits = split_count(kernel, x2.device, row_blocks, n_chunks, n_acc * B * D,
                             (acc_dt, points.dtype, *consts.items()), lambda: (sample_args(bn), consts),
                             WORKSPACE_ELEMENTS)
    S = max(1, min(int(splits), n_chunks))
    n_per_split = cdiv(n_chunks, S) * bn
    S = cdiv(N, n_per_split)
    return (row_blocks, S), S, n_per_split, consts


def delta_mixture_forward(x2: torch.Tensor, points: torch.Tensor, log_weights: torch.Tensor | None,
                          center: torch.Tensor, sigma: torch.Tensor, score: bool = False,
                          precision: str = "ieee", splits: int | None = None,
                          blocks: tuple[int, int, int, int] | None = None):
    """Delta-mixture denoiser (or score) of x2 [B, d] over points [N, d] (any float storage).

    Returns (out [B, d] in the accumulation dtype, centred frame added back; log_z [B]) with
    log_z = logsumexp_i(log_weights_i - ||x - x_i||^2 / (2 sigma^2)) - d/2 log(2 pi sigma^2).
    """
    acc_dt = compute_dtype(x2, points, log_weights)
    x2, points, center = x2.contiguous(), points.contiguous(), as_contiguous(center, acc_dt)
    B, D = x2.shape
    N = points.shape[0]
    dev = x2.device
    s2 = clamped_sigma_sq(sigma, B, acc_dt)
    lw = as_contiguous(log_weights, acc_dt) if log_weights is not None else s2
    key = ("delta", B, N, D, acc_dt, x2.dtype, points.dtype, log_weights is not None, precision, splits, blocks,
           dev)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _remember(key, delta_plan(_delta_partial_kernel, (_DELTA_BLOCKS, _DELTA_EXACT_D_BLOCKS), x2, points,
                                         log_weights is not None, acc_dt, precision, splits, blocks, 1,
                                         lambda bn: (x2, points, lw, center, s2, x2, s2.double(), s2, B, N, D, bn)))
    grid, S, n_per_split, consts = plan
    # The partial states: scratch tensors reused between calls of this signature (the kernel writes m and l
    # and accumulates into acc, zeroed here).
    acc, m, l = workspaces.get(key, x2, lambda: (torch.empty((S, B, D), dtype=acc_dt, device=dev),
                                                  # float64 logits (docs/math.md section 3.2)
                                                  torch.empty((S, B), dtype=torch.float64, device=dev),
                                                  torch.empty((S, B), dtype=acc_dt, device=dev)))
    acc.zero_()
    if B > 0:
        with device_guard(x2):
            _delta_partial_kernel[grid](x2, points, lw, center, s2, acc, m, l, B, N, D, n_per_split, **consts)
    # acc holds sum p (x_i - ctr): D - ctr = acc / W, score = (acc - W (x - ctr)) / (W sigma^2); one launch.
    out, log_z, _, _ = merge(m, l, acc, -l if score else None, x2, center, s2, add_ctr=not score,
                             divide_by_s2=score, log_norm_scale=0.5 * D, stats=False)
    return out, log_z


def _gmm_workspace(S, B, D, K, R, return_weights, acc_dt, dev):
    """(acc, m, l, x_sum, logits, c scratch) of one GMM launch; pointers the kernel does not touch (no
    stored logits, no bases) get a live buffer, not an allocation."""
    acc = torch.empty((S, B, D), dtype=acc_dt, device=dev)
    m = torch.empty((S, B), dtype=torch.float64, device=dev)  # float64 logits (docs/math.md section 3.2)
    l, x_sum = (torch.empty((S, B), dtype=acc_dt, device=dev) for _ in range(2))
    logits = torch.empty((B, K), dtype=torch.float64, device=dev) if return_weights else m
    c_scratch = torch.empty((S, B, R), dtype=acc_dt, device=dev) if R > 0 else m
    return acc, m, l, x_sum, logits, c_scratch


def gmm_operands(x2, log_weights, means, bases, eigvals, lam_perp, sigma):
    """(acc_dt, x2, means, s2, bases, eigvals, lam_perp, log_weights) as the GMM kernels take them: contiguous,
    sigma^2 clamped per row, a live buffer in place of an absent operand (the kernels do not touch it)."""
    acc_dt = compute_dtype(x2, means, bases, eigvals, lam_perp, log_weights)
    x2, means = x2.contiguous(), means.contiguous()
    s2 = clamped_sigma_sq(sigma, x2.shape[0], acc_dt)
    has_bases = bases is not None and bases.shape[2] > 0
    return (acc_dt, x2, means, s2, bases.contiguous() if has_bases else means,
            as_contiguous(eigvals, acc_dt) if has_bases else s2,
            as_contiguous(lam_perp, acc_dt) if lam_perp is not None else s2, as_contiguous(log_weights, acc_dt))


def gmm_forward(x2: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, bases: torch.Tensor | None,
                eigvals: torch.Tensor | None, lam_perp: torch.Tensor | None, center: torch.Tensor,
                sigma: torch.Tensor, score: bool = False, return_weights: bool = False,
                precision: str = "ieee", splits: int | None = None, blocks: tuple[int, int, int] | None = None,
                max_block_r: int = _GMM_MAX_BLOCK_R):
    """GMM denoiser (or score) of x2 [B, d]; returns (out [B, d], log_z [B], weights [B, K] or empty).

    Any rank r: the modes are processed in slices of BLOCK_R <= max_block_r with c = U_k^T (x - mu_k) kept
    in a [S, B, r] scratch between the two passes over d."""
    acc_dt, x2, means, s2, bases_c, eig_c, lp_c, lw_c = gmm_operands(x2, log_weights, means, bases, eigvals, lam_perp,
                                                                     sigma)
    center = as_contiguous(center, acc_dt)
    B, D = x2.shape
    K = means.shape[0]
    R = 0 if bases is None else bases.shape[2]
    dev = x2.device
    has_bases = R > 0
    key = ("gmm", B, K, D, R, acc_dt, x2.dtype, means.dtype, bases_c.dtype, lam_perp is not None, score,
           return_weights, precision, splits, blocks, max_block_r, dev)
    plan = _PLANS.get(key)
    if plan is None:
        if blocks is None:
            blocks = _GMM_BLOCKS[(acc_dt == torch.float32, B > 16)]
        bb, bd, warps = blocks
        block_r = max(16, min(max_block_r, 1 << (max(R, 1) - 1).bit_length()))  # next power of 2
        row_blocks = cdiv(B, bb)
        prec = precision if acc_dt == torch.float32 else "ieee"
        consts = dict(HAS_BASES=has_bases, HAS_LP=lam_perp is not None, FULL_RANK=R == D,
                      STORE_LOGITS=return_weights, SCORE=score, PRECISION=prec, ACC=_tl_dtype(acc_dt), BLOCK_B=bb,
                      BLOCK_D=bd, BLOCK_R=block_r, num_warps=warps)
        S = splits
        if S is None:
            S = split_count(_gmm_partial_kernel, dev, row_blocks, K, B * max(D, R), (acc_dt, *consts.items()),
                            lambda: ((x2, means, bases_c, eig_c, lp_c, lw_c, center, s2, x2, s2.double(), s2, s2,
                                      s2.double(), x2,
                                      B, K, D, R, 16), consts),
                            WORKSPACE_ELEMENTS)
        S = max(1, min(int(S), K))
        k_per_split = cdiv(K, S)
        plan = _remember(key, ((row_blocks, cdiv(K, k_per_split)), cdiv(K, k_per_split), k_per_split, consts))
    grid, S, k_per_split, consts = plan
    # Scratch tensors reused between calls of this signature: the partial states (the kernel writes m, l,
    # x_sum and accumulates into acc, zeroed here), the logits and the c scratch.
    acc, m, l, x_sum, logits, c_scratch = workspaces.get(
        key, x2, lambda: _gmm_workspace(S, B, D, K, R, return_weights, acc_dt, dev))
    acc.zero_()
    if B > 0:
        with device_guard(x2):
            _gmm_partial_kernel[grid](
                x2, means, bases_c, eig_c, lp_c, lw_c, center, s2,
                acc, m, l, x_sum, logits, c_scratch, B, K, D, R, k_per_split, **consts)
    out, log_z, shift, inv_w = merge(m, l, acc, x_sum, x2, center, s2, add_ctr=not score, divide_by_s2=False,
                                     log_norm_scale=0.5 * D, stats=return_weights)
    # exp(logit - M) / W rather than exp(logit - log_z): M is one of the logits (exact difference).
    weights = (torch.exp(logits - shift[:, None]).mul_(inv_w[:, None]).to(acc_dt) if return_weights
               else acc.new_empty((0,)))
    return out, log_z, weights


def aot_cases(full: bool = False):
    """Launch configurations for gsa_kernels.triton_aot (compile for a GPU architecture without a GPU).

    full=False: a representative subset (both kernels, both accumulators, half points, each precision).
    full=True: every entry of both tile tables, float32 entries in every precision mode, each with the
    points storage types and kernel variants that use the most registers (low-rank GMM with lam_perp and
    stored logits; full-rank score)."""
    def delta(dt, pts, prec, big, exact_d=False):
        f32_logits = dt == "fp32" and not exact_d
        bb, bn, bd, warps = _DELTA_EXACT_D_BLOCKS if exact_d else _DELTA_BLOCKS[(dt == "fp32", big)]
        ptrs = {n: "*" + dt for n in ("x_ptr", "lw_ptr", "ctr_ptr", "s2_ptr", "acc_ptr", "sum_ptr")}
        return _delta_partial_kernel, {"pts_ptr": "*" + pts, **ptrs, "max_ptr": "*fp64",
                                       **dict.fromkeys(("B", "N", "D", "n_per_split"), "i32"),
                                       "HAS_LW": True, "PRECISION": prec, "ACC": tl.float32 if dt == "fp32" else tl.float64,
                                       "LOGIT": tl.float32 if f32_logits else tl.float64,
                                       "BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_D": bd, "num_warps": warps}

    def gmm(dt, prec, big, full_rank, score):
        bb, bd, warps = _GMM_BLOCKS[(dt == "fp32", big)]
        names = ("x_ptr", "means_ptr", "bases_ptr", "eig_ptr", "lp_ptr", "lw_ptr", "ctr_ptr", "s2_ptr", "acc_ptr",
                 "sum_ptr", "xsum_ptr", "c_ptr")
        return _gmm_partial_kernel, {**{n: "*" + dt for n in names}, "max_ptr": "*fp64", "logit_ptr": "*fp64",
                                     **dict.fromkeys(("B", "K", "D", "R", "k_per_split"), "i32"),
                                     "HAS_BASES": True, "HAS_LP": not full_rank, "FULL_RANK": full_rank, "STORE_LOGITS": True,
                                     "SCORE": score, "PRECISION": prec, "ACC": tl.float32 if dt == "fp32" else tl.float64,
                                     "BLOCK_B": bb, "BLOCK_D": bd, "BLOCK_R": _GMM_MAX_BLOCK_R, "num_warps": warps}

    if not full:
        yield delta("fp32", "fp32", "ieee", True)
        yield delta("fp32", "bf16", "tf32x3", False)
        yield delta("fp32", "fp16", "tf32", True)
        yield delta("fp64", "fp64", "ieee", True)
        yield gmm("fp32", "tf32x3", True, False, False)
        yield gmm("fp32", "ieee", False, True, True)
        yield gmm("fp64", "ieee", True, False, True)
        yield delta("fp32", "fp32", "ieee", True, exact_d=True)
        return
    for variant in aot_delta_variants(_DELTA_BLOCKS):
        yield delta(*variant)
    for is_f32, big in _GMM_BLOCKS:
        for prec in AOT_PRECISIONS if is_f32 else ("ieee",):
            for full_rank, score in ((False, False), (True, True)):
                yield gmm("fp32" if is_f32 else "fp64", prec, big, full_rank, score)


AOT_PRECISIONS = ("ieee", "tf32x3", "tf32")


def aot_delta_variants(blocks):
    """(accumulation dtype, points dtype, precision, B > 16, exact d) of every entry of a training-set tile table
    keyed by (float32, B > 16): float32 in every precision mode with float32 and bf16 points, then the
    low-d (float64 tile) entry."""
    for is_f32, big in blocks:
        if is_f32:
            for prec in AOT_PRECISIONS:
                for pts in ("fp32", "bf16"):
                    yield "fp32", pts, prec, big, False
        else:
            yield "fp64", "fp64", "ieee", big, False
    for pts in ("fp32", "bf16"):
        yield "fp32", pts, "ieee", True, True
