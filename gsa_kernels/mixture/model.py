"""GMM and DeltaMixture: Gaussian mixtures and the training set as nn.Modules (docs/math.md section 3).

Both take x of shape [B, ...] (prod(...) = d) and sigma as a number or a [B] tensor, and offer
.denoise, .score, .log_prob, .posterior (GMM) and .forward (everything in one pass). Parameters are
buffers, so .to() and state_dict() carry them; from_state_dict() rebuilds a model.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .._validation import FLOAT_DTYPES, PARAM_DTYPES, as_sigma, check_nonneg, check_tensor
from . import ops

_ROWS_PER_STEP = 1 << 15


def _check_finite_chunked(name: str, t: torch.Tensor) -> None:
    """isfinite over a large tensor, a slab at a time (no [N, d] boolean temporary)."""
    flat = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
    for i in range(0, flat.shape[0], _ROWS_PER_STEP):
        if not bool(torch.isfinite(flat[i:i + _ROWS_PER_STEP]).all()):
            raise ValueError(f"{name} has non-finite values (NaN or inf)")


class _Mixture(nn.Module):
    """Shared API; subclasses implement partial() (the raw, unnormalized op outputs)."""

    def partial(self, x, sigma, *, score=False, return_weights=False, center=None):
        """(out, log_z, weights) of this model's components: out is D (or the score), log_z [B] is
        logsumexp_i(log_weights_i + log N_i(x)) with the stored (unnormalized) log-weights. Shards of a
        bigger mixture merge exactly from these (gsa_kernels.mixture.distributed)."""
        raise NotImplementedError

    def log_weight_norm(self):
        raise NotImplementedError

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.center.dtype == torch.float64 else torch.float32

    def _sigma(self, x, sigma):
        check_tensor("x", x, dtypes=FLOAT_DTYPES)
        if x.dim() < 2:
            raise ValueError(f"x must have shape [B, ...] with at least one data dimension, got {tuple(x.shape)}")
        dt = torch.float64 if x.dtype == torch.float64 else self.compute_dtype
        return as_sigma("sigma", sigma, x.shape[0], x.device, dtype=dt)

    def forward(self, x, sigma, *, score=False, return_weights=False) -> ops.MixtureOutput:
        """One pass: denoiser (or score), log p_sigma(x) [B] and optionally posterior weights [B, K]."""
        out, log_z, w = self.partial(x, sigma, score=score, return_weights=return_weights)
        return ops.MixtureOutput(out, log_z - self.log_weight_norm(), w if return_weights else None)

    def denoise(self, x, sigma) -> torch.Tensor:
        """Posterior mean D(x; sigma) = E[x0 | x]."""
        return self.partial(x, sigma)[0]

    def score(self, x, sigma) -> torch.Tensor:
        """grad_x log p_sigma(x) = (D - x) / sigma^2."""
        return self.partial(x, sigma, score=True)[0]

    def log_prob(self, x, sigma) -> torch.Tensor:
        """log p_sigma(x) of the noised mixture (weights normalized), [B]."""
        return self.partial(x, sigma)[1] - self.log_weight_norm()


class GMM(_Mixture):
    """Gaussian mixture: log_weights [K] (any normalization), means [K, d], optional low-rank covariances
    bases [K, d, r] (orthonormal columns) with eigvals [K, r] >= 0, and lam_perp [K] >= 0 (variance off
    the span of each basis; None: 0). r = 0 (bases=None) gives isotropic components lam_perp_i I."""

    def __init__(self, log_weights, means, bases=None, eigvals=None, lam_perp=None):
        super().__init__()
        check_tensor("means", means, ndim=2, dtypes=PARAM_DTYPES)
        K, d = means.shape
        if K == 0:
            raise ValueError("means must hold at least one component (K >= 1), got K = 0")
        dt, dev = means.dtype, means.device
        if bases is None:
            if eigvals is not None and eigvals.numel():
                raise ValueError("eigvals given without bases")
            bases = torch.zeros((K, d, 0), dtype=dt, device=dev)
            eigvals = torch.zeros((K, 0), dtype=dt, device=dev)
        if lam_perp is None:
            lam_perp = torch.zeros(K, dtype=dt, device=dev)
        lam_perp = torch.as_tensor(lam_perp, dtype=dt, device=dev)
        if lam_perp.dim() == 0:
            lam_perp = lam_perp.expand(K)
        # Shapes (errors name the argument) with a dummy x of the right d.
        probe = means.new_empty((0, d))
        ops._check_meta(probe, log_weights, means, bases, eigvals, lam_perp, None)
        check_tensor("log_weights", log_weights, ndim=1, dtypes=PARAM_DTYPES, device=dev)
        _check_finite_chunked("means", means)
        _check_finite_chunked("bases", bases)
        check_nonneg("eigvals", eigvals)
        check_nonneg("lam_perp", lam_perp)
        ops.check_log_weights(log_weights)
        self.register_buffer("log_weights", log_weights.to(dt).contiguous())
        self.register_buffer("means", means.contiguous())
        self.register_buffer("bases", bases.to(dt).contiguous())
        self.register_buffer("eigvals", eigvals.to(dt).contiguous())
        self.register_buffer("lam_perp", lam_perp.to(dt).contiguous())
        self.register_buffer("center", ops.mean_of_rows(means).to(dt), persistent=False)

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def rank(self) -> int:
        return self.bases.shape[2]

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, dim={self.dim}, rank={self.rank}, dtype={self.means.dtype}"

    def log_weight_norm(self):
        return torch.logsumexp(self.log_weights, dim=0)

    def partial(self, x, sigma, *, score=False, return_weights=False, center=None):
        s = self._sigma(x, sigma)
        bases, eig = (self.bases, self.eigvals) if self.rank > 0 else (None, None)
        return torch.ops.gsa.gmm_forward(x, self.log_weights, self.means, bases, eig, self.lam_perp, s,
                                         self.center if center is None else center, score, return_weights)

    def posterior(self, x, sigma) -> torch.Tensor:
        """Posterior component probabilities w [B, K] (docs/math.md section 3)."""
        return self.partial(x, sigma, return_weights=True)[2]

    @classmethod
    def from_state_dict(cls, state_dict) -> "GMM":
        return cls(state_dict["log_weights"], state_dict["means"], state_dict["bases"], state_dict["eigvals"],
                   state_dict["lam_perp"])

    @classmethod
    def fit(cls, data, n_components: int, rank: int = 0, seed: int = 0, *, n_iter: int = 50,
            dtype=torch.float32) -> "GMM":
        """k-means (k-means++ init, seeded; Lloyd iterations on data's device) then per-cluster moments.

        Each cluster j gets weight n_j / n, its mean, the top-`rank` eigenpairs of its covariance
        (maximum likelihood, 1/n_j, accumulated in float64 after centring) and lam_perp_j = mean of the
        discarded eigenvalues = (trace - sum of kept) / (d - rank). Covariances are never stored: one
        d x d float64 matrix exists at a time, inside eigh, and a cluster with n_j < d uses the n_j x n_j
        Gram matrix instead. Singleton clusters are delta components (zero covariance); clusters that
        stay empty (fewer distinct points than components) are dropped with a warning.
        """
        check_tensor("data", data)
        if data.dim() < 2:
            raise ValueError(f"data must have shape [n, ...], got {tuple(data.shape)}")
        X = data.reshape(data.shape[0], -1)
        n, d = X.shape
        if not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {n_components!r}")
        if n_components > n:
            raise ValueError(f"n_components must be <= the number of samples ({n}), got {n_components}")
        if not isinstance(rank, int) or not 0 <= rank <= d:
            raise ValueError(f"rank must be an int in [0, d = {d}], got {rank!r}")
        _check_finite_chunked("data", X)
        gen = torch.Generator(device=X.device).manual_seed(seed)
        labels = _kmeans(X, n_components, n_iter, gen)
        params = [_cluster_moments(X[labels == j], rank, n, gen) for j in range(n_components)]
        kept = [p for p in params if p is not None]
        if len(kept) < n_components:
            warnings.warn(f"GMM.fit: {n_components - len(kept)} empty cluster(s) dropped "
                          f"(the data has fewer distinct points than n_components)")
        log_w, mean, basis, eig, lam_perp = (torch.stack([p[i] for p in kept]).to(dtype) for i in range(5))
        return cls(log_w, mean, basis, eig, lam_perp)


class DeltaMixture(_Mixture):
    """The training set as a mixture of deltas (docs/math.md section 3): points [N, ...] (float32/float64, or
    float16/bfloat16 storage to halve memory; accumulation is float32) and optional log-weights [N]
    (None: uniform). Its denoiser is the exact optimal denoiser of the empirical distribution."""

    def __init__(self, points, log_weights=None):
        super().__init__()
        check_tensor("points", points, dtypes=FLOAT_DTYPES)
        if points.dim() < 2:
            raise ValueError(f"points must have shape [N, ...] with at least one data dimension, "
                             f"got {tuple(points.shape)}")
        if points.shape[0] == 0:
            raise ValueError("points must hold at least one point (N >= 1), got N = 0")
        pts = points.reshape(points.shape[0], -1).contiguous()
        _check_finite_chunked("points", pts)
        if log_weights is not None:
            check_tensor("log_weights", log_weights, ndim=1, dtypes=PARAM_DTYPES, device=pts.device)
            if log_weights.shape[0] != pts.shape[0]:
                raise ValueError(f"log_weights must have shape [N] = [{pts.shape[0]}], got {tuple(log_weights.shape)}")
            ops.check_log_weights(log_weights)
            log_weights = log_weights.contiguous()
        self.register_buffer("points", pts)
        self.register_buffer("log_weights", log_weights)
        ct = torch.float64 if pts.dtype == torch.float64 else torch.float32
        self.register_buffer("center", ops.mean_of_rows(pts).to(ct), persistent=False)

    @property
    def n_points(self) -> int:
        return self.points.shape[0]

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def extra_repr(self) -> str:
        return f"n_points={self.n_points}, dim={self.dim}, dtype={self.points.dtype}"

    def log_weight_norm(self):
        return ops.log_weight_norm(self.log_weights, self.n_points, self.compute_dtype)

    def partial(self, x, sigma, *, score=False, return_weights=False, center=None):
        if return_weights:
            raise ValueError("return_weights: DeltaMixture does not return [B, N] posterior weights")
        s = self._sigma(x, sigma)
        out, log_z = torch.ops.gsa.delta_mixture_forward(x, self.points, self.log_weights, s,
                                                         self.center if center is None else center, score)
        return out, log_z, None

    @classmethod
    def from_state_dict(cls, state_dict) -> "DeltaMixture":
        return cls(state_dict["points"], state_dict.get("log_weights"))


# ---------------------------------------------------------------------------------------------
# Fitting helpers.
def _sq_dist_to_centers(X: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
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


def _kmeans(X: torch.Tensor, k: int, n_iter: int, gen: torch.Generator) -> torch.Tensor:
    n = X.shape[0]
    # k-means++: each new centre is a point drawn with probability proportional to D(x)^2.
    first = int(torch.randint(n, (1,), generator=gen, device=X.device))
    centers = X[first:first + 1].to(torch.float64)
    d2 = _sq_dist_to_centers(X, centers)[:, 0].double()
    for _ in range(1, k):
        if float(d2.sum()) > 0:
            nxt = int(torch.multinomial(d2, 1, generator=gen))
        else:  # every point coincides with a centre already
            nxt = int(torch.randint(n, (1,), generator=gen, device=X.device))
        centers = torch.cat([centers, X[nxt:nxt + 1].to(torch.float64)])
        d2 = torch.minimum(d2, _sq_dist_to_centers(X, centers[-1:])[:, 0].double())
    # Lloyd iterations; sums in float64.
    labels = None
    for _ in range(n_iter):
        dist = _sq_dist_to_centers(X, centers)
        best, new_labels = dist.min(dim=1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centers)
        for i in range(0, n, _ROWS_PER_STEP):
            sums.index_add_(0, labels[i:i + _ROWS_PER_STEP], X[i:i + _ROWS_PER_STEP].to(torch.float64))
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():  # re-seed each empty cluster at a point far from its centre
            far = torch.topk(best, min(empty.numel(), n)).indices
            centers[empty[: far.numel()]] = X[far].to(torch.float64)
    return _sq_dist_to_centers(X, centers).argmin(dim=1)


def _complete_basis(U: torch.Tensor, r: int, gen: torch.Generator) -> torch.Tensor:
    """Extend orthonormal columns U [d, m] to r orthonormal columns (the new ones span zero-variance directions)."""
    d, m = U.shape
    if m >= r:
        return U[:, :r]
    extra = torch.randn(d, r - m, generator=gen, device=U.device, dtype=torch.float64)
    for _ in range(2):  # project out U twice for orthogonality to float64 precision
        extra = extra - U @ (U.T @ extra)
    q, _ = torch.linalg.qr(extra)
    return torch.cat([U, q], dim=1)


def _cluster_moments(Xj: torch.Tensor, rank: int, n: int, gen: torch.Generator):
    """(log weight, mean, basis [d, rank], eigvals [rank], lam_perp) of one cluster, in float64."""
    nj, d = Xj.shape
    if nj == 0:
        return None
    mean = ops.mean_of_rows(Xj)
    trace = torch.zeros((), dtype=torch.float64, device=Xj.device)
    if nj >= d:
        cov = torch.zeros((d, d), dtype=torch.float64, device=Xj.device)
        for i in range(0, nj, _ROWS_PER_STEP):
            xc = Xj[i:i + _ROWS_PER_STEP].to(torch.float64) - mean
            cov += xc.T @ xc
        cov /= nj
        trace = cov.diagonal().sum()
        evals, evecs = torch.linalg.eigh(cov)
        del cov
        evals, U = evals.flip(0)[:rank].clamp_min(0), evecs.flip(1)[:, :rank]
    else:
        # Gram trick: X_c X_c^T / n_j shares the nonzero eigenvalues; U = X_c^T V / sqrt(n_j lam).
        xc = Xj.to(torch.float64) - mean
        gram = xc @ xc.T / nj
        trace = gram.diagonal().sum()
        evals, V = torch.linalg.eigh(gram)
        evals, V = evals.flip(0).clamp_min(0), V.flip(1)
        tol = float(evals[0]) * nj * torch.finfo(torch.float64).eps * 10 if nj else 0.0
        keep = int((evals[:rank] > tol).sum())
        U = (xc.T @ V[:, :keep]) / torch.sqrt(nj * evals[:keep])
        U = _complete_basis(U, rank, gen)
        evals = torch.cat([evals[:keep], evals.new_zeros(rank - keep)])
    lam_perp = ((trace - evals.sum()).clamp_min(0) / (d - rank)) if rank < d else trace.new_zeros(())
    log_w = torch.tensor(math.log(nj / n), dtype=torch.float64, device=Xj.device)
    return log_w, mean, U.contiguous(), evals, lam_perp
