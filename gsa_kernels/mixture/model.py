"""GMM and DeltaMixture: Gaussian mixtures and the training set as nn.Modules (MATH.md section 3).

Both take x of shape [B, ...] (prod(...) = d) and sigma as a number or a [B] tensor, and offer
.denoise, .score, .log_prob, .posterior (GMM) and .forward (everything in one pass). Parameters are
buffers, so .to() and state_dict() carry them; from_state_dict() rebuilds a model.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validation import FLOAT_DTYPES, PARAM_DTYPES, as_sigma, check_nonneg, check_tensor
from . import ops
from .fit import cluster_moments as _cluster_moments  # noqa: F401  (kept name)

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
        """Posterior component probabilities w [B, K] (MATH.md 3)."""
        return self.partial(x, sigma, return_weights=True)[2]

    @classmethod
    def from_state_dict(cls, state_dict) -> "GMM":
        return cls(state_dict["log_weights"], state_dict["means"], state_dict["bases"], state_dict["eigvals"],
                   state_dict["lam_perp"])

    @classmethod
    def fit(cls, data, n_components: int, rank: int = 0, seed: int = 0, *, n_iter: int = 50, tol: float = 1e-4,
            init=None, init_size: int | None = None, method: str = "auto", n_passes: int = 10,
            oversampling: int = 10, device=None, dtype=torch.float32, sharded: bool = False, group=None,
            verbose: bool = True) -> "GMM":
        """k-means, then per-cluster moments (not EM): streamed over data, a tensor [n, ...] or a
        re-iterable of batches (a DataLoader of tensors or (tensor, label) tuples), on `device`.

        k-means++ (seeded) on an init sample of `init_size` rows, then Lloyd iterations (one pass each,
        sums in float64) until the squared centre shift is <= tol * mean variance or n_iter passes. Each
        cluster j gets weight n_j / n, its mean, the top-`rank` eigenpairs of its maximum-likelihood
        covariance (1/n_j) and lam_perp_j = mean of the discarded eigenvalues; method "full" (K d x d
        scatters, eigh), "lowrank" (streamed subspace iteration, n_passes passes, O(K d (rank +
        oversampling)) memory) or "auto". Singleton clusters are delta components; clusters that stay
        empty are dropped with a warning. sharded: each torch.distributed rank passes its own shard.
        verbose: progress bars (tqdm). The model gets n_iter_, converged_ and inertia_ (sum of squared
        distances to the cluster means). See gsa_kernels.mixture.fit and docs/fitting.md.
        """
        from .fit import fit_gmm

        res = fit_gmm(data, n_components, rank, seed, n_iter=n_iter, tol=tol, init=init, init_size=init_size,
                      method=method, n_passes=n_passes, oversampling=oversampling, device=device,
                      sharded=sharded, group=group, verbose=verbose)
        model = cls(res.log_weights.to(dtype), res.means.to(dtype), res.bases.to(dtype), res.eigvals.to(dtype),
                    res.lam_perp.to(dtype))
        model.n_iter_, model.converged_, model.inertia_ = res.n_iter, res.converged, res.inertia
        return model


class DeltaMixture(_Mixture):
    """The training set as a mixture of deltas (MATH.md 3): points [N, ...] (float32/float64, or
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
