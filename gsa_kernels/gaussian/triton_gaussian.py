"""Triton kernels of the Gaussian ops (docs/math.md section 2.1), as two fused GEMMs:

  1. project-and-scale:  G[b, k] = (f_b(lam_k) - f_b(lam_perp)) * sum_j (x[b, j] - mu[j]) U[j, k]
     (centring is fused into the operand load, the per-mode factor into the epilogue);
  2. reconstruct:        out[b, j] = [mu[j]] + f_b(lam_perp) (x[b, j] - mu[j]) + sum_k G[b, k] U[j, k]
     (the residual term and the mean are fused into the epilogue).

Traffic is x twice, U twice, out once; the [B, r] intermediate is small. Both GEMMs accumulate in
float32 whatever the storage type of x; the matrix-unit precision is `ieee` (exact float32), `tf32x3`
(split products, float32-level accuracy) or `tf32`. The same kernels run under TRITON_INTERPRET=1 on
CPU tensors, which is how CI tests them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Map ids shared with the reference and the C++ kernels' order.
PROJECT, DENOISE, SCORE, TELEPORT = 0, 1, 2, 3


@triton.jit
def _mode_factor(lam, s_a, s_b, MAP: tl.constexpr):
    # f(l) of docs/math.md section 2.1 for the map; s_a is sigma (or sigma_from), s_b is sigma_to.
    if MAP == 1:
        return lam / (lam + s_a * s_a)
    elif MAP == 2:
        return -1.0 / (lam + s_a * s_a)
    elif MAP == 3:
        return tl.sqrt((lam + s_b * s_b) / (lam + s_a * s_a))
    else:
        return lam * 0.0 + 1.0


@triton.jit
def _project_scale_kernel(
    x_ptr, mean_ptr, basis_ptr, eig_ptr, lam_perp_ptr, sa_ptr, sb_ptr, g_ptr,
    B, D, R,
    MAP: tl.constexpr, FULL_RANK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    modes = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    mode_ok = modes < R
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    for j0 in range(0, D, BLOCK_D):
        cols = j0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        xt = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        mu = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        xc = tl.where(row_ok[:, None] & col_ok[None, :], xt.to(tl.float32) - mu.to(tl.float32)[None, :], 0.0)
        ut = tl.load(basis_ptr + cols[:, None] * R + modes[None, :], mask=col_ok[:, None] & mode_ok[None, :], other=0.0)
        acc += tl.dot(xc, ut.to(tl.float32), input_precision=PRECISION)
    if MAP != 0:
        lam = tl.load(eig_ptr + modes, mask=mode_ok, other=0.0).to(tl.float32)
        s_a = tl.load(sa_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        s_b = tl.load(sb_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        factor = _mode_factor(lam[None, :], s_a[:, None], s_b[:, None], MAP)
        if not FULL_RANK:
            lam_perp = tl.load(lam_perp_ptr).to(tl.float32)
            factor -= _mode_factor(lam_perp, s_a[:, None], s_b[:, None], MAP)
        acc = acc * factor
    tl.store(g_ptr + rows[:, None] * R + modes[None, :], acc.to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & mode_ok[None, :])


@triton.jit
def _reconstruct_kernel(
    x_ptr, mean_ptr, basis_ptr, g_ptr, lam_perp_ptr, sa_ptr, sb_ptr, out_ptr,
    B, D, R,
    MAP: tl.constexpr, FULL_RANK: tl.constexpr, ADD_MEAN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    col_ok = cols < D
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_R):
        modes = k0 + tl.arange(0, BLOCK_R)
        mode_ok = modes < R
        gt = tl.load(g_ptr + rows[:, None] * R + modes[None, :], mask=row_ok[:, None] & mode_ok[None, :], other=0.0)
        # U^T tile [BLOCK_R, BLOCK_D] read from row-major U [D, R].
        ut = tl.load(basis_ptr + cols[None, :] * R + modes[:, None], mask=mode_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(gt, ut.to(tl.float32), input_precision=PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    mu = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if not FULL_RANK:
        s_a = tl.load(sa_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        s_b = tl.load(sb_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        lam_perp = tl.load(lam_perp_ptr).to(tl.float32)
        f_perp = _mode_factor(lam_perp, s_a, s_b, MAP)
        xt = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += f_perp[:, None] * (xt - mu[None, :])
    if ADD_MEAN:
        acc += mu[None, :]
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(batch: int):
    # Small batches are bandwidth-bound: a short B tile keeps more programs in flight.
    block_b = 16 if batch <= 16 else 64
    return block_b, 64, 32


def project(x2: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """c = U^T (x - mu) for x2 [B, d]; returns float32 [B, r]."""
    x2, mean, basis = x2.contiguous(), mean.contiguous(), basis.contiguous()
    B, D = x2.shape
    R = basis.shape[1]
    out = torch.empty((B, R), dtype=torch.float32, device=x2.device)
    bb, br, bd = _blocks(B)
    grid = (triton.cdiv(B, bb), triton.cdiv(R, br))
    _project_scale_kernel[grid](x2, mean, basis, mean, mean, mean, mean, out, B, D, R,
                                MAP=PROJECT, FULL_RANK=True, PRECISION=precision,
                                BLOCK_B=bb, BLOCK_R=br, BLOCK_D=bd)
    return out


def gaussian_map(map_id: int, x2: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, eigvals: torch.Tensor,
                 lam_perp: torch.Tensor, sigma_a: torch.Tensor, sigma_b: torch.Tensor,
                 out: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """Denoise / score / teleport of contiguous x2 [B, d] into `out` [B, d] (any float dtype).

    sigma_a, sigma_b: [B]. The kernels index densely, so every operand is made contiguous here
    (a no-op for the wrappers in ops.py, which already pass contiguous float32 parameters).
    """
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    x2, mean, basis, eigvals, lam_perp, sigma_a, sigma_b = (
        t.contiguous() for t in (x2, mean, basis, eigvals, lam_perp, sigma_a, sigma_b))
    B, D = x2.shape
    R = basis.shape[1]
    full_rank = R == D
    g = torch.empty((B, R), dtype=torch.float32, device=x2.device)
    bb, br, bd = _blocks(B)
    _project_scale_kernel[(triton.cdiv(B, bb), triton.cdiv(R, br))](
        x2, mean, basis, eigvals, lam_perp, sigma_a, sigma_b, g, B, D, R,
        MAP=map_id, FULL_RANK=full_rank, PRECISION=precision, BLOCK_B=bb, BLOCK_R=br, BLOCK_D=bd)
    _reconstruct_kernel[(triton.cdiv(B, bb), triton.cdiv(D, 64))](
        x2, mean, basis, g, lam_perp, sigma_a, sigma_b, out, B, D, R,
        MAP=map_id, FULL_RANK=full_rank, ADD_MEAN=map_id != SCORE, PRECISION=precision,
        BLOCK_B=bb, BLOCK_D=64, BLOCK_R=32)
    return out


def aot_cases():
    """Launch configurations for gsa_kernels.triton_aot (compile for sm_90 without a GPU): every map
    and rank case in float32/ieee at both tile shapes, and every storage type x precision for teleport."""
    scalars = {"B": "i32", "D": "i32", "R": "i32"}
    combos = [(m, "*fp32", "ieee", b) for m in (PROJECT, DENOISE, SCORE, TELEPORT) for b in (1, 256)]
    combos += [(TELEPORT, t, p, 256) for t in ("*fp16", "*bf16") for p in ("ieee",)]
    combos += [(TELEPORT, "*fp32", p, 256) for p in ("tf32x3", "tf32")]
    for map_id, x_type, precision, batch in combos:
        bb, br, bd = _blocks(batch)
        ptrs = dict.fromkeys(["mean_ptr", "basis_ptr", "eig_ptr", "lam_perp_ptr", "sa_ptr", "sb_ptr", "g_ptr"], "*fp32")
        yield _project_scale_kernel, {**ptrs, "x_ptr": x_type, **scalars, "MAP": map_id, "FULL_RANK": map_id == PROJECT,
                                      "PRECISION": precision, "BLOCK_B": bb, "BLOCK_R": br, "BLOCK_D": bd}
        if map_id == PROJECT:
            continue
        ptrs = dict.fromkeys(["mean_ptr", "basis_ptr", "g_ptr", "lam_perp_ptr", "sa_ptr", "sb_ptr"], "*fp32")
        yield _reconstruct_kernel, {**ptrs, "x_ptr": x_type, "out_ptr": x_type, **scalars, "MAP": map_id,
                                    "FULL_RANK": batch == 1, "ADD_MEAN": map_id != SCORE,
                                    "PRECISION": precision, "BLOCK_B": bb, "BLOCK_D": 64, "BLOCK_R": 32}
