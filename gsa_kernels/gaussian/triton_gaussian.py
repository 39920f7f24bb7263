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

from .._core.cache import workspaces
from .._core.launch import LaunchPlans, cdiv, device_guard
from . import map_kind

# The map ids (map_kind.py) as constants the kernels can read (compiled Triton reads constexpr globals).
PROJECT = tl.constexpr(map_kind.PROJECT)
DENOISE = tl.constexpr(map_kind.DENOISE)
SCORE = tl.constexpr(map_kind.SCORE)
TELEPORT = tl.constexpr(map_kind.TELEPORT)


@triton.jit
def _mode_factor(lam, s_a, s_b, MAP: tl.constexpr):
    # f(l) of docs/math.md section 2.1 for the map; s_a is sigma (or sigma_from), s_b is sigma_to.
    if MAP == DENOISE:
        return lam / (lam + s_a * s_a)
    elif MAP == SCORE:
        return -1.0 / (lam + s_a * s_a)
    elif MAP == TELEPORT:
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
    # One grid axis (x: up to 2^31 - 1 programs), row tiles fastest: the programs of one mode tile run
    # together and share its basis columns in L2.
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(B, BLOCK_B)
    pid_b = pid % n_row_tiles
    pid_r = pid // n_row_tiles
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    modes = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    mode_ok = modes < R
    # Offsets in int64: B d and d r may exceed 2^31 elements.
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    for j0 in range(0, D, BLOCK_D):
        cols = j0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        xt = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        mu = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        xc = tl.where(row_ok[:, None] & col_ok[None, :], xt.to(tl.float32) - mu.to(tl.float32)[None, :], 0.0)
        ut = tl.load(basis_ptr + cols.to(tl.int64)[:, None] * R + modes[None, :],
                     mask=col_ok[:, None] & mode_ok[None, :], other=0.0)
        acc += tl.dot(xc, ut.to(tl.float32), input_precision=PRECISION)
    if MAP != PROJECT:
        lam = tl.load(eig_ptr + modes, mask=mode_ok, other=0.0).to(tl.float32)
        s_a = tl.load(sa_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        s_b = tl.load(sb_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        factor = _mode_factor(lam[None, :], s_a[:, None], s_b[:, None], MAP)
        if not FULL_RANK:
            lam_perp = tl.load(lam_perp_ptr).to(tl.float32)
            factor -= _mode_factor(lam_perp, s_a[:, None], s_b[:, None], MAP)
        acc = acc * factor
    tl.store(g_ptr + rows.to(tl.int64)[:, None] * R + modes[None, :], acc.to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & mode_ok[None, :])


@triton.jit
def _reconstruct_kernel(
    x_ptr, mean_ptr, basis_ptr, g_ptr, lam_perp_ptr, sa_ptr, sb_ptr, out_ptr,
    B, D, R,
    MAP: tl.constexpr, FULL_RANK: tl.constexpr, ADD_MEAN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One grid axis (cdiv(d, BLOCK_D) exceeds the 65535 of a y axis beyond d ~ 4.2M), row tiles fastest:
    # the programs of one column tile run together and share its basis rows in L2.
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(B, BLOCK_B)
    pid_b = pid % n_row_tiles
    pid_d = pid // n_row_tiles
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    col_ok = cols < D
    # Offsets in int64: B d, B r and d r may exceed 2^31 elements.
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_R):
        modes = k0 + tl.arange(0, BLOCK_R)
        mode_ok = modes < R
        gt = tl.load(g_ptr + rows64[:, None] * R + modes[None, :], mask=row_ok[:, None] & mode_ok[None, :], other=0.0)
        # U^T tile [BLOCK_R, BLOCK_D] read from row-major U [D, R].
        ut = tl.load(basis_ptr + cols.to(tl.int64)[None, :] * R + modes[:, None],
                     mask=mode_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(gt, ut.to(tl.float32), input_precision=PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    mu = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if not FULL_RANK:
        s_a = tl.load(sa_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        s_b = tl.load(sb_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        lam_perp = tl.load(lam_perp_ptr).to(tl.float32)
        f_perp = _mode_factor(lam_perp, s_a, s_b, MAP)
        xt = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += f_perp[:, None] * (xt - mu[None, :])
    if ADD_MEAN:
        acc += mu[None, :]
    tl.store(out_ptr + rows64[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(batch: int):
    # Small batches are bandwidth-bound: a short B tile keeps more programs in flight.
    block_b = 16 if batch <= 16 else 64
    return block_b, 64, 32


RECONSTRUCT_BLOCK_D = 64
RECONSTRUCT_BLOCK_R = 32


def project(x2: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """c = U^T (x - mu) for x2 [B, d]; returns float32 [B, r]."""
    x2, mean, basis = x2.contiguous(), mean.contiguous(), basis.contiguous()
    B, D = x2.shape
    R = basis.shape[1]
    out = torch.empty((B, R), dtype=torch.float32, device=x2.device)
    bb, br, bd = _blocks(B)
    with device_guard(x2):
        _project_scale_kernel[(cdiv(B, bb) * cdiv(R, br),)](
            x2, mean, basis, mean, mean, mean, mean, out, B, D, R, MAP=map_kind.PROJECT, FULL_RANK=True,
            PRECISION=precision, BLOCK_B=bb, BLOCK_R=br, BLOCK_D=bd)
    return out


_PLANS = LaunchPlans()


def _map_plan(map_id: int, B: int, D: int, R: int, precision: str):
    """(grid, constexprs) of the two launches of one map call."""
    bb, br, bd = _blocks(B)
    row_tiles = cdiv(B, bb)
    full_rank = R == D
    project_scale = ((row_tiles * cdiv(R, br),),
                     dict(MAP=map_id, FULL_RANK=full_rank, PRECISION=precision, BLOCK_B=bb, BLOCK_R=br, BLOCK_D=bd))
    reconstruct = ((row_tiles * cdiv(D, RECONSTRUCT_BLOCK_D),),
                   dict(MAP=map_id, FULL_RANK=full_rank, ADD_MEAN=map_id != map_kind.SCORE, PRECISION=precision,
                        BLOCK_B=bb, BLOCK_D=RECONSTRUCT_BLOCK_D, BLOCK_R=RECONSTRUCT_BLOCK_R))
    return project_scale, reconstruct


def gaussian_map(map_id: int, x2: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, eigvals: torch.Tensor,
                 lam_perp: torch.Tensor, sigma_a: torch.Tensor, sigma_b: torch.Tensor,
                 out: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """Denoise / score / teleport of x2 [B, d] into `out` [B, d] (any float dtype).

    Every tensor must be contiguous (the kernels index densely): x2, out, the float32 parameters mean [d],
    basis [d, r], eigvals [r], lam_perp (one element), and sigma_a, sigma_b [B] (the same tensor twice for the maps
    of one sigma). The CUDA kernels (cuda.py) pass them so without copies on the hot path.
    """
    if not (x2.is_contiguous() and mean.is_contiguous() and basis.is_contiguous() and eigvals.is_contiguous()
            and lam_perp.is_contiguous() and sigma_a.is_contiguous() and sigma_b.is_contiguous()
            and out.is_contiguous()):
        for name, t in (("x2", x2), ("mean", mean), ("basis", basis), ("eigvals", eigvals), ("lam_perp", lam_perp),
                        ("sigma_a", sigma_a), ("sigma_b", sigma_b), ("out", out)):
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
    B, D = x2.shape
    R = basis.shape[1]
    dev = x2.device
    key = (map_id, B, D, R, precision)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.remember(key, _map_plan(map_id, B, D, R, precision))
    (grid_p, consts_p), (grid_r, consts_r) = plan
    # g: the [B, r] scaled projection between the two launches (a reused scratch tensor).
    g, = workspaces.get(("gaussian g", B, R, dev), x2,
                        lambda: (torch.empty((B, R), dtype=torch.float32, device=dev),))
    with device_guard(x2):
        _project_scale_kernel[grid_p](x2, mean, basis, eigvals, lam_perp, sigma_a, sigma_b, g, B, D, R, **consts_p)
        _reconstruct_kernel[grid_r](x2, mean, basis, g, lam_perp, sigma_a, sigma_b, out, B, D, R, **consts_r)
    return out


def aot_cases(full: bool = False):
    """Launch configurations for gsa_kernels.triton_aot (compile for a GPU architecture without a GPU).

    full=False: the projection and every map at both tile shapes in float32/ieee, and every storage type
    x precision for teleport. FULL_RANK is a property of the model (r == d) and takes the same value in
    the two kernels of a launch; the map cases pair the small tile with full rank and the large tile with
    low rank, so that each kernel compiles in both rank variants and both tile shapes.
    full=True: besides, every tile entry (B <= 16, B > 16) of every map in every precision mode."""
    scalars = {"B": "i32", "D": "i32", "R": "i32"}
    combos = [(map_kind.PROJECT, "*fp32", "ieee", b, True) for b in (1, 256)]
    combos += [(m, "*fp32", "ieee", b, full) for m in (map_kind.DENOISE, map_kind.SCORE, map_kind.TELEPORT)
               for b, full in ((1, True), (256, False))]
    combos += [(map_kind.TELEPORT, t, "ieee", 256, False) for t in ("*fp16", "*bf16")]
    combos += [(map_kind.TELEPORT, "*fp32", p, 256, False) for p in ("tf32x3", "tf32")]
    if full:
        combos += [(m, "*fp32", p, b, full_rank)
                   for m in (map_kind.PROJECT, map_kind.DENOISE, map_kind.SCORE, map_kind.TELEPORT)
                   for p in ("tf32x3", "tf32") for b, full_rank in ((1, True), (256, False))]
        combos += [(map_kind.PROJECT, "*fp32", p, 256, True) for p in ("tf32x3", "tf32")]
    for map_id, x_type, precision, batch, full_rank in combos:
        bb, br, bd = _blocks(batch)
        ptrs = dict.fromkeys(["mean_ptr", "basis_ptr", "eig_ptr", "lam_perp_ptr", "sa_ptr", "sb_ptr", "g_ptr"], "*fp32")
        yield _project_scale_kernel, {**ptrs, "x_ptr": x_type, **scalars, "MAP": map_id, "FULL_RANK": full_rank,
                                      "PRECISION": precision, "BLOCK_B": bb, "BLOCK_R": br, "BLOCK_D": bd}
        if map_id == map_kind.PROJECT:
            continue
        ptrs = dict.fromkeys(["mean_ptr", "basis_ptr", "g_ptr", "lam_perp_ptr", "sa_ptr", "sb_ptr"], "*fp32")
        yield _reconstruct_kernel, {**ptrs, "x_ptr": x_type, "out_ptr": x_type, **scalars, "MAP": map_id,
                                    "FULL_RANK": full_rank, "ADD_MEAN": map_id != map_kind.SCORE,
                                    "PRECISION": precision, "BLOCK_B": bb, "BLOCK_D": RECONSTRUCT_BLOCK_D,
                                    "BLOCK_R": RECONSTRUCT_BLOCK_R}
