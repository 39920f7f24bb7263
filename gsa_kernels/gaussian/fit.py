"""Streaming fits of Gaussians to data: mean and top covariance eigenpairs (docs/math.md section 2 and 3.1).

Data arrive as batches (a tensor, a list of tensors, a DataLoader yielding tensors or (tensor, label)
tuples, numpy arrays). Two methods:

* "full": the d x d scatter matrix is accumulated in float64 and decomposed with eigh. O(d^2) memory,
  O(d^3) time: the method for d up to a few thousand (the default up to FULL_MAX_DIM).
* "lowrank": randomized subspace iteration (a block power method with Rayleigh-Ritz, Halko, Martinsson &
  Tropp 2011, Alg. 4.4 without forming the matrix). Pass p streams the data once and accumulates
  Y = C Q_p for k = rank + oversampling orthonormal probe vectors Q_p [d, k]; the Ritz pairs of
  Q_p^T Y estimate the top eigenpairs and Q_{p+1} = orth(Y) starts the next pass. Memory O(d k); the
  d x d covariance never exists. The first pass also yields the mean and the trace, so no extra pass
  is spent on them. lam_perp is the exact mean of the discarded variance: (trace - sum of the kept
  eigenvalues) / (d - rank), with the trace streamed exactly, not extrapolated from the kept ones.
  The residual ||C u_i - lam_i u_i|| of every Ritz pair comes free from the last pass (`residuals`):
  |lam_i - exact| <= residual_i, and <= residual_i^2 / gap_i once the residual is below the gap.

Every batch is centred on its own mean in float64 and merged by Chan et al.'s update (for the scatter, its
diagonal and the sketch alike), so no float32 cancellation eats the small-eigenvalue tail. With sharded=True
each torch.distributed rank streams its own shard and the per-rank moments and sketches are merged exactly
across ranks (two all_reduce calls per pass; the probe vectors come from `seed` on the CPU, so every rank
uses the same ones): the result equals one process reading all shards, up to float rounding.

The grouped form (n_groups > 1 with an `assign` function giving each row its group) fits one Gaussian per
group in the same passes: GMM.fit's per-cluster moments.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .._core import collectives
from .._core.progress import Progress
from .._validation import check_finite, check_tensor

FULL_MAX_DIM = 4096        # "auto" uses eigh of the d x d covariance up to this d (128 MiB in float64)
_STEP_BYTES = 1 << 26      # rows of a batch processed at a time: at most 64 MiB of float64
METHODS = ("auto", "full", "lowrank")


# ----------------------------------------------------------------------------------------------------
# Data
def _as_batch_tensor(batch, name):
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"{name} yielded an empty tuple/list")
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    check_tensor(name, batch)
    if batch.dim() < 2:
        raise ValueError(f"{name} batches must have shape [N, ...], got {tuple(batch.shape)}")
    return batch.reshape(batch.shape[0], -1)


def iter_rows(data, *, device=None, dtype=torch.float64, name: str = "data"):
    """Yield [b, d] slabs of `data` as `dtype` on `device`, checked (finite, one d), at most 64 MiB each."""
    batches = [data] if isinstance(data, (torch.Tensor, np.ndarray)) else data
    d = None
    for batch in batches:
        xb = _as_batch_tensor(batch, name)
        if d is None:
            d = xb.shape[1]
        elif xb.shape[1] != d:
            raise ValueError(f"{name} batches disagree on d: {d} then {xb.shape[1]}")
        step = max(1, _STEP_BYTES // (8 * max(d, 1)))
        for i in range(0, xb.shape[0], step):
            x = xb[i:i + step]
            if device is not None:
                x = x.to(device)
            x = x.to(dtype)
            if x.shape[0]:
                check_finite(name, x)
                yield x


def check_reiterable(data, n_passes: int, name: str = "data") -> None:
    """Multi-pass fits need data they can read again: a tensor, a list or a DataLoader, not a generator."""
    if n_passes > 1 and not isinstance(data, (torch.Tensor, np.ndarray)) and iter(data) is data:
        raise TypeError(f"{name} is a one-shot iterator but this fit reads it {n_passes} times: pass a tensor, "
                        f"a list of batches or a DataLoader")


# ----------------------------------------------------------------------------------------------------
# Moments
class Moments:
    """Per-group float64 running moments merged by Chan et al.'s update: counts n_j, means mu_j [d], the
    per-coordinate sums of squared deviations (their sum is the scatter's trace) and either the scatter
    applied to probe vectors, S_j Q_j [d, k] (probes [K, d, k]), or the full scatter S_j [d, d] (full)."""

    def __init__(self, n_groups: int, d: int, device, *, probes: torch.Tensor | None = None, full: bool = False):
        f64 = dict(dtype=torch.float64, device=device)
        self.count = torch.zeros(n_groups, **f64)
        self.mean = torch.zeros(n_groups, d, **f64)
        self.sq = torch.zeros(n_groups, d, **f64)
        self.probes = probes
        self.sketch = torch.zeros(n_groups, d, probes.shape[-1], **f64) if probes is not None else None
        self.scatter = torch.zeros(n_groups, d, d, **f64) if full else None

    def add(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Merge the rows x [b, d] (float64) into group 0, or into groups labels [b]."""
        if labels is None:
            self._merge(0, x)
            return
        for j in torch.unique(labels).tolist():
            self._merge(j, x[labels == j])

    def _merge(self, j: int, xb: torch.Tensor) -> None:
        nb = xb.shape[0]
        na = float(self.count[j])
        n = na + nb
        mb = xb.mean(0)
        cb = xb - mb
        delta = mb - self.mean[j]
        f = na * nb / n
        self.mean[j] += delta * (nb / n)
        self.sq[j] += (cb * cb).sum(0) + delta * delta * f
        if self.sketch is not None:
            q = self.probes[j]
            self.sketch[j] += cb.T @ (cb @ q) + torch.outer(delta * f, delta @ q)
        if self.scatter is not None:
            self.scatter[j] += cb.T @ cb + torch.outer(delta * f, delta)
        self.count[j] = n

    def all_reduce(self, group=None) -> None:
        """Merge every rank's moments into the moments of the union (exact: the shards' Chan merge)."""
        K = self.count.shape[0]
        tot = collectives.all_sum(torch.cat([self.count[:, None], self.count[:, None] * self.mean], 1), group)
        n = tot[:, 0]
        mean = torch.where(n[:, None] > 0, tot[:, 1:] / n.clamp_min(1)[:, None], torch.zeros_like(self.mean))
        delta = self.mean - mean                       # this rank's mean minus the global one
        w = self.count[:, None] * delta                # n_r (mu_r - mu)
        parts = [self.sq + w * delta]
        if self.sketch is not None:
            parts.append((self.sketch + w[:, :, None] * (delta[:, None, :] @ self.probes)).reshape(K, -1))
        if self.scatter is not None:
            parts.append((self.scatter + w[:, :, None] * delta[:, None, :]).reshape(K, -1))
        merged = collectives.all_sum(torch.cat(parts, 1), group)
        d = self.mean.shape[1]
        self.count, self.mean, self.sq = n, mean, merged[:, :d]
        off = d
        if self.sketch is not None:
            k = self.sketch.shape[-1]
            self.sketch = merged[:, off:off + d * k].reshape(K, d, k)
            off += d * k
        if self.scatter is not None:
            self.scatter = merged[:, off:].reshape(K, d, d)


# ----------------------------------------------------------------------------------------------------
# Fits
@dataclass
class GaussianFit:
    """Per-group fit results (float64): K groups, rank r."""
    count: torch.Tensor        # [K]
    mean: torch.Tensor         # [K, d]
    basis: torch.Tensor        # [K, d, r], orthonormal columns, sign-normalized
    eigvals: torch.Tensor      # [K, r], descending, >= 0
    lam_perp: torch.Tensor     # [K]
    trace: torch.Tensor        # [K], total variance
    method: str
    n_passes: int              # passes over the data made
    residuals: torch.Tensor | None = None   # [K, r] ||C u - lam u|| of the low-rank Ritz pairs


def choose_method(method: str, d: int, rank: int | None, n_groups: int = 1) -> str:
    """'auto' -> 'full' when d <= FULL_MAX_DIM (and the K scatter matrices take at most 1 GiB) or when no
    rank is asked for, else 'lowrank'."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "lowrank" and rank is None:
        raise ValueError("method='lowrank' needs a rank")
    if method != "auto":
        return method
    if rank is None or (d <= FULL_MAX_DIM and n_groups * d * d * 8 <= 1 << 30):
        return "full"
    return "lowrank"


def _canonical_signs(U: torch.Tensor) -> torch.Tensor:
    """Flip each column [.., d, r] so that its largest-magnitude entry is positive (reproducible signs)."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    s = torch.sign(torch.gather(U, -2, idx))
    return U * torch.where(s == 0, torch.ones_like(s), s)


def _pass(data, K, d, device, assign, group, sharded, progress, **moment_kwargs) -> Moments:
    acc = None
    for x in iter_rows(data, device=device):
        if acc is None:
            if d is not None and x.shape[1] != d:
                raise ValueError(f"data has d = {x.shape[1]}, expected {d}")
            acc = Moments(K, x.shape[1], x.device, **moment_kwargs)
        acc.add(x, None if assign is None else assign(x))
        progress.update(0)
    if acc is None:
        if not sharded:
            raise ValueError("data must hold at least 2 samples (it is empty)")
        if d is None:
            raise ValueError("data is empty on this rank: every rank needs at least one batch to learn d")
        acc = Moments(K, d, torch.device("cpu") if device is None else device, **moment_kwargs)
    if sharded:
        acc.all_reduce(group)
    progress.update(1)
    return acc


def fit_moments(data, rank: int | None, *, n_groups: int = 1, assign=None, method: str = "auto",
                n_passes: int = 10, oversampling: int = 10, tol: float | None = 1e-5, seed: int = 0,
                ddof: int = 1, device=None, sharded: bool = False, group=None, verbose: bool = False,
                d: int | None = None, desc: str = "fit") -> GaussianFit:
    """Fit n_groups Gaussians (mean, top-`rank` eigenpairs, lam_perp) in passes over `data`.

    rank None keeps every eigenpair (full method only); rank 0 fits means and total variances only (one
    pass). ddof: the covariance divides by n_j - ddof (1: unbiased, 0: maximum likelihood). assign(x [b, d])
    -> labels [b] in [0, n_groups) for grouped fits. n_passes: the most low-rank passes; tol: stop once
    every kept Ritz pair has residual <= tol * its eigenvalue (None: make all n_passes). See the module docstring for the methods.
    """
    if not isinstance(n_passes, int) or n_passes < 1:
        raise ValueError(f"n_passes must be a positive int, got {n_passes!r}")
    if not isinstance(oversampling, int) or oversampling < 0:
        raise ValueError(f"oversampling must be an int >= 0, got {oversampling!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 0):
        raise ValueError(f"rank must be a non-negative int or None, got {rank!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None, got {tol!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    K = n_groups
    progress = Progress(desc, None, verbose, group)
    try:
        if rank == 0:
            acc = _pass(data, K, d, device, assign, group, sharded, progress)
            return _finish(acc, 0, ddof, "moments", 1)
        if d is None:  # d is needed before the first pass (for the probes)
            d, data = _peek_dim(data, sharded)
        if rank is not None and rank > d:
            raise ValueError(f"rank must lie in [0, d = {d}], got {rank}")
        chosen = choose_method(method, d, rank, K)
        if chosen == "full":
            acc = _pass(data, K, d, device, assign, group, sharded, progress, full=True)
            return _finish(acc, rank, ddof, "full", 1)
        check_reiterable(data, n_passes)
        return _subspace_iteration(data, rank, K, d, assign, n_passes, oversampling, tol, seed, ddof, device,
                                   sharded, group, progress)
    finally:
        progress.close()


def _peek_dim(data, sharded):
    """(d, data): d from the first batch; a one-shot iterator gets its first batch put back."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        if data.ndim < 2:
            raise ValueError(f"data must have shape [N, ...], got {tuple(data.shape)}")
        return int(np.prod(data.shape[1:])), data
    it = iter(data)
    first = next(it, None)
    if first is None:
        if sharded:
            raise ValueError("data is empty on this rank: pass d= for sharded fits with empty shards")
        raise ValueError("data must hold at least 2 samples (it is empty)")
    d = _as_batch_tensor(first, "data").shape[1]
    return d, (itertools.chain([first], it) if it is data else data)


def _denominator(count: torch.Tensor, ddof: int) -> torch.Tensor:
    return (count - ddof).clamp_min(1)


def _finish(acc: Moments, rank, ddof, method, n_passes) -> GaussianFit:
    """Eigen-decomposition of the accumulated scatters (full) or means and traces only (rank 0)."""
    n_total = float(acc.count.sum())
    if n_total < 2:
        raise ValueError(f"data must hold at least 2 samples, got {int(n_total)}")
    K, d = acc.mean.shape
    denom = _denominator(acc.count, ddof)
    trace = acc.sq.sum(1) / denom
    if acc.scatter is None:  # rank 0
        empty = acc.mean.new_zeros((K, d, 0))
        return GaussianFit(acc.count, acc.mean, empty, acc.mean.new_zeros((K, 0)), trace / d, trace, method,
                           n_passes)
    cov = acc.scatter / denom[:, None, None]
    acc.scatter = None
    evals, evecs = torch.linalg.eigh(cov)
    del cov
    evals, evecs = evals.flip(-1).clamp_min(0.0), evecs.flip(-1)
    r = d if rank is None else rank
    lam_perp = evals[:, r:].mean(1) if r < d else evals.new_zeros(K)
    basis = _canonical_signs(evecs[:, :, :r]).contiguous()
    return GaussianFit(acc.count, acc.mean, basis, evals[:, :r].contiguous(), lam_perp, trace, method, n_passes)


def _subspace_iteration(data, rank, K, d, assign, n_passes, oversampling, tol, seed, ddof, device, sharded,
                        group, progress) -> GaussianFit:
    k = min(rank + oversampling, d)
    gen = torch.Generator().manual_seed(seed)   # on the CPU: the same probes on every rank and device
    omega = torch.randn(K, d, k, generator=gen, dtype=torch.float64)
    dev = torch.device("cpu") if device is None else torch.device(device)
    Q = torch.linalg.qr(omega.to(dev)).Q
    done = 0
    for p in range(n_passes):
        acc = _pass(data, K, d, device, assign, group, sharded, progress, probes=Q)
        done = p + 1
        if float(acc.count.sum()) < 2:
            raise ValueError(f"data must hold at least 2 samples, got {int(acc.count.sum())}")
        Y = acc.sketch / _denominator(acc.count, ddof)[:, None, None]          # C Q
        B = Q.transpose(1, 2) @ Y
        evals, V = torch.linalg.eigh((B + B.transpose(1, 2)) / 2)               # Rayleigh-Ritz
        evals, V = evals.flip(-1), V.flip(-1)
        U = Q @ V
        residuals = torch.linalg.vector_norm(Y @ V - U * evals[:, None, :], dim=1)   # ||C u - lam u||
        if tol is not None and bool((residuals[:, :rank] <= tol * evals[:, :rank].abs()).all()):
            break
        if p + 1 < n_passes:
            Q = torch.linalg.qr(Y).Q
    trace = acc.sq.sum(1) / _denominator(acc.count, ddof)
    eig = evals[:, :rank].clamp_min(0.0).contiguous()
    lam_perp = ((trace - eig.sum(1)) / (d - rank)).clamp_min(0.0) if rank < d else trace.new_zeros(K)
    basis = _canonical_signs(U[:, :, :rank]).contiguous()
    return GaussianFit(acc.count, acc.mean, basis, eig, lam_perp, trace, "lowrank", done,
                       residuals[:, :rank].contiguous())


def fit_gaussian(data, rank: int | None = None, *, method: str = "auto", n_passes: int = 10,
                 oversampling: int = 10, tol: float | None = 1e-5, seed: int = 0, device=None,
                 sharded: bool = False, group=None, verbose: bool = False) -> GaussianFit:
    """One Gaussian (unbiased covariance, divides by N - 1): GaussianModel.fit's implementation."""
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    return fit_moments(data, rank, method=method, n_passes=n_passes, oversampling=oversampling, tol=tol,
                       seed=seed, ddof=1, device=device, sharded=sharded, group=group, verbose=verbose,
                       desc="GaussianModel.fit")
