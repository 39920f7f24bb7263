"""GMM.fit: k-means clustering, then one Gaussian per cluster from its moments (docs/math.md section 3).

The algorithm is k-means plus per-cluster moments, not EM (EM refinement was measured: it helps on
overlapping clusters and overfits on the digits; see docs/fitting.md). Every step streams over batches, so data
may be a tensor or a DataLoader bigger than memory, and sharded over torch.distributed ranks:

1. One pass: the sample count, per-coordinate variances (for the tolerance) and an init sample of
   `init_size` rows: the rows with the smallest keys of an exact hash of their float64 bits. The sample
   depends on the rows' values only, not on batch order or on how the rows are sharded across ranks, so one
   process and many give the same sample (ranks all_gather their candidates).
2. k-means++ on the sample (seeded): each new centre a sample row drawn with probability ~ D(x)^2.
3. Lloyd iterations, one pass each: assign every row to its nearest centre, sum rows (float64) and counts
   per cluster (all_reduce across ranks), move the centres to the means. Stops when the squared centre
   shift summed over clusters is <= tol * mean per-coordinate variance (n_iter_, converged_). A cluster
   left empty is re-seeded at the sample row farthest from its centre.
4. Per-cluster moments (gsa_kernels.gaussian.fit.fit_moments, grouped): weight n_j / n, mean, the top-`rank`
   eigenpairs of the maximum-likelihood covariance (divides by n_j) and lam_perp_j = mean of the discarded
   eigenvalues. "full" accumulates K d x d scatters (small d); "lowrank" streamed subspace iteration
   (O(K d (rank + oversampling)) memory). Singleton clusters are delta components (zero covariance);
   clusters that stay empty are dropped with a warning. inertia_ = sum_i ||x_i - mean of its cluster||^2.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .._core import collectives
from .._core.progress import Progress
from ..gaussian.fit import Moments, _peek_dim, check_reiterable, fit_moments, iter_rows

_KEY_MAX = torch.iinfo(torch.int64).max


@dataclass
class GMMFit:
    log_weights: torch.Tensor   # [K'] float64 (K' = clusters left non-empty)
    means: torch.Tensor         # [K', d]
    bases: torch.Tensor         # [K', d, r]
    eigvals: torch.Tensor       # [K', r]
    lam_perp: torch.Tensor      # [K']
    n_iter: int
    converged: bool
    inertia: float
    method: str


# ----------------------------------------------------------------------------------------------------
# Distances and the init sample
def sq_dist_to_centers(X: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """[n, K] squared distances, a slab of rows at a time, by the expansion centred on the centres' mean."""
    ref = centers.mean(0)
    c = (centers - ref).to(torch.float32 if X.dtype != torch.float64 else torch.float64)
    cn = (c * c).sum(1)
    out = torch.empty((X.shape[0], centers.shape[0]), dtype=c.dtype, device=X.device)
    step = max(1, (1 << 22) // max(centers.shape[0], X.shape[1]))
    for i in range(0, X.shape[0], step):
        xr = X[i:i + step].to(c.dtype) - ref.to(c.dtype)
        out[i:i + step] = ((xr * xr).sum(1, keepdim=True) - 2 * xr @ c.T + cn).clamp_min_(0)
    return out


def _row_keys(x: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """Exact hash of each float64 row's bits: sum_j bits_j * mult_j mod 2^64, then mixed. Integer sums
    wrap identically in any order, so the key depends on the row's values alone."""
    h = (x.contiguous().view(torch.int64) * mult).sum(1)
    h = h ^ (h >> 31)
    h = h * -7046029254386353131   # 0x9E3779B97F4A7C15 as int64: spreads the bits
    return h ^ (h >> 29)


def _keep_smallest(keys, rows, m):
    order = torch.sort(keys, stable=True).indices[:m]
    return keys[order], rows[order]


class _InitSample:
    """The m rows with the smallest keys seen so far."""

    def __init__(self, m: int, d: int, seed: int, device):
        g = torch.Generator().manual_seed(seed + 0x5EED)
        self.mult = (torch.randint(-(1 << 62), 1 << 62, (d,), generator=g, dtype=torch.int64) | 1).to(device)
        self.m = m
        self.keys = torch.empty(0, dtype=torch.int64, device=device)
        self.rows = torch.empty(0, d, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        keys = _row_keys(x, self.mult)
        if keys.shape[0] > self.m:  # cut the batch first: fewer rows to concatenate
            keys, x = _keep_smallest(keys, x, self.m)
        self.keys, self.rows = _keep_smallest(torch.cat([self.keys, keys]), torch.cat([self.rows, x]), self.m)

    def gather(self, group) -> None:
        """Every rank ends with the m smallest-key rows of the union (padding keys are the int64 max)."""
        pad = self.m - self.keys.shape[0]
        keys = torch.cat([self.keys, self.keys.new_full((pad,), _KEY_MAX)])
        rows = torch.cat([self.rows, self.rows.new_zeros(pad, self.rows.shape[1])])
        n_real = int(collectives.all_sum(torch.tensor([self.keys.shape[0]], device=keys.device), group))
        keys, rows = collectives.all_gather_rows(keys, group), collectives.all_gather_rows(rows, group)
        self.keys, self.rows = _keep_smallest(keys, rows, min(self.m, n_real))


def kmeans_plus_plus(sample: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k centres [k, d] (float64) chosen from the rows of `sample` by seeded k-means++."""
    n = sample.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = sample[first:first + 1]
    d2 = sq_dist_to_centers(sample, centers)[:, 0]
    for _ in range(1, k):
        if float(d2.sum()) > 0:
            nxt = int(torch.multinomial(d2.cpu(), 1, generator=gen))
        else:  # every row coincides with a centre already
            nxt = int(torch.randint(n, (1,), generator=gen))
        centers = torch.cat([centers, sample[nxt:nxt + 1]])
        d2 = torch.minimum(d2, sq_dist_to_centers(sample, centers[-1:])[:, 0])
    return centers


def nearest_center(centers: torch.Tensor):
    return lambda x: sq_dist_to_centers(x, centers).argmin(dim=1)


# ----------------------------------------------------------------------------------------------------
# The fit
def fit_gmm(data, n_components: int, rank: int = 0, seed: int = 0, *, n_iter: int = 50, tol: float = 1e-4,
            init: torch.Tensor | None = None, init_size: int | None = None, method: str = "auto",
            n_passes: int = 10, oversampling: int = 10, device=None, sharded: bool = False, group=None,
            verbose: bool = True) -> GMMFit:
    """GMM.fit's implementation; see the module docstring. init: optional initial centres [K, d]
    (skips k-means++)."""
    if not isinstance(n_components, int) or isinstance(n_components, bool) or n_components < 1:
        raise ValueError(f"n_components must be a positive int, got {n_components!r}")
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if init_size is not None and (not isinstance(init_size, int) or init_size < n_components):
        raise ValueError(f"init_size must be an int >= n_components = {n_components}, got {init_size!r}")
    K = n_components
    d, data = _peek_dim(data, sharded)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= d:
        raise ValueError(f"rank must be an int in [0, d = {d}], got {rank!r}")
    if init is not None:
        if not isinstance(init, torch.Tensor) or tuple(init.reshape(init.shape[0], -1).shape) != (K, d):
            raise ValueError(f"init must be a tensor of shape [n_components, d] = [{K}, {d}]")
    check_reiterable(data, 2)
    dev = None if device is None else torch.device(device)
    if init_size is None:
        init_size = max(3 * K, min(10_000, (1 << 28) // (8 * d)))

    # 1. Count, variances and the init sample.
    stats, sample = None, None
    for x in iter_rows(data, device=dev):
        if stats is None:
            stats = Moments(1, d, x.device)
            sample = _InitSample(init_size, d, seed, x.device)
        stats.add(x)
        sample.add(x)
    if stats is None:
        if not sharded:
            raise ValueError("data must hold at least one sample (it is empty)")
        stats, sample = Moments(1, d, dev or "cpu"), _InitSample(init_size, d, seed, dev or "cpu")
    if sharded:
        stats.all_reduce(group)
        sample.gather(group)
    n = int(stats.count[0])
    if K > n:
        raise ValueError(f"n_components must be <= the number of samples ({n}), got {K}")
    tol_abs = tol * float(stats.sq[0].sum()) / (n * d)

    # 2. Initial centres.
    gen = torch.Generator().manual_seed(seed)
    if init is not None:
        centers = init.reshape(K, d).to(device=sample.rows.device, dtype=torch.float64)
    else:
        centers = kmeans_plus_plus(sample.rows, K, gen)

    # 3. Lloyd iterations.
    progress = Progress("GMM.fit k-means", n_iter, verbose, group)
    converged, it = False, 0
    try:
        for it in range(1, n_iter + 1):
            sums = torch.zeros_like(centers)
            counts = torch.zeros(K, dtype=torch.float64, device=centers.device)
            inertia = torch.zeros(1, dtype=torch.float64, device=centers.device)
            for x in iter_rows(data, device=dev):
                best, labels = sq_dist_to_centers(x, centers).min(dim=1)
                sums.index_add_(0, labels, x)
                counts += torch.bincount(labels, minlength=K).to(torch.float64)
                inertia += best.sum().to(torch.float64)
            if sharded:
                packed = collectives.all_sum(torch.cat([sums.reshape(-1), counts, inertia]), group)
                sums, counts, inertia = packed[:K * d].reshape(K, d), packed[K * d:-1], packed[-1:]
            new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
            empty = torch.nonzero(counts == 0).flatten()
            if empty.numel():  # re-seed each empty cluster at a sample row far from every centre
                far = torch.topk(sq_dist_to_centers(sample.rows, new).min(dim=1).values,
                                 min(empty.numel(), sample.rows.shape[0])).indices
                new[empty[: far.numel()]] = sample.rows[far]
            shift = float(((new - centers) ** 2).sum())
            centers = new
            progress.update(1, inertia=f"{float(inertia):.6g}", shift=f"{shift:.3g}")
            if shift <= tol_abs:
                converged = True
                break
    finally:
        progress.close()
    if not converged:
        warnings.warn(f"GMM.fit: k-means did not converge in n_iter = {n_iter} iterations "
                      f"(raise n_iter or tol)", RuntimeWarning)

    # 4. Per-cluster moments.
    res = fit_moments(data, rank, n_groups=K, assign=nearest_center(centers), method=method,
                      n_passes=n_passes, oversampling=oversampling, seed=seed, ddof=0, device=dev,
                      sharded=sharded, group=group, verbose=verbose, d=d, desc="GMM.fit moments")
    kept = res.count > 0
    if not bool(kept.all()):
        warnings.warn(f"GMM.fit: {int((~kept).sum())} empty cluster(s) dropped "
                      f"(the data has fewer distinct points than n_components)")
    count = res.count[kept]
    inertia_final = float((res.trace[kept] * count).sum())   # ML trace times n_j = sum of squared deviations
    return GMMFit(torch.log(count / n), res.mean[kept], res.basis[kept], res.eigvals[kept], res.lam_perp[kept],
                  it, converged, inertia_final, res.method)


def cluster_moments(Xj: torch.Tensor, rank: int, n: int, gen: torch.Generator | None = None):
    """(log weight, mean, basis [d, rank], eigvals [rank], lam_perp) of one cluster's rows Xj [n_j, d] out of
    n, in float64 (maximum-likelihood covariance, eigh)."""
    res = fit_moments(Xj.to(torch.float64), rank, ddof=0, method="full")
    log_w = torch.tensor(math.log(Xj.shape[0] / n), dtype=torch.float64, device=Xj.device)
    return log_w, res.mean[0], res.basis[0], res.eigvals[0], res.lam_perp[0]
