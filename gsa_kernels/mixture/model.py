"""GMM and DeltaMixture: Gaussian mixtures and the training set as nn.Modules (docs/math.md section 3).

Both take x of shape [B, ...] (prod(...) = d) and sigma as a number or a [B] tensor, and offer
.denoise, .score, .log_prob, .posterior (GMM) and .forward (everything in one pass). Parameters are
buffers, so .to() and state_dict() carry them; from_state_dict() rebuilds a model. Their values are
checked once, by checked_state() at construction and at load (every way in checks and copies the
same way); a call only checks what the op checks (meta.py, the C++ kernels).
"""
from __future__ import annotations

import torch
from torch import nn

from .._core.dtypes import compute_dtype
from .._core.errors import call_op
from .._validation import FLOAT_DTYPES, check_orthonormal, check_tensor, owned, sigma_arg
from .._validation import orthonormalize as orthonormalize_columns
from . import meta, ops


class Mixture(nn.Module):
    """Shared API of GMM and DeltaMixture; subclasses implement partial() (the raw, unnormalized op outputs)."""

    def partial(self, x, sigma, *, score=False, return_weights=False, center=None):
        """(out, log_z, weights) of this model's components: out is D (or the score), log_z [B] is
        logsumexp_i(log_weights_i + log N_i(x)) with the stored (unnormalized) log-weights. Shards of a
        bigger mixture merge exactly from these (gsa_kernels.mixture.distributed)."""
        raise NotImplementedError

    def log_weight_norm(self):
        raise NotImplementedError

    def _rows(self) -> torch.Tensor:
        """The component means / points, whose mean is the reference point of the distance expansion."""
        raise NotImplementedError

    def _refresh_center(self):
        # The centre is derived from the state, not stored in it: it is recomputed whenever the rows
        # change (construction, load, dtype / device moves), so outputs depend on the state alone.
        rows = self._rows()
        self.register_buffer("center", ops.mean_of_rows(rows).to(compute_dtype(rows)), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._refresh_center()
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.center)

    def _sigma(self, x, sigma):
        return sigma_arg("sigma", sigma, x, dtype=compute_dtype(x, self.center))

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


class GMM(Mixture):
    """Gaussian mixture: log_weights [K] (any normalization), means [K, d], optional low-rank covariances
    bases [K, d, r] (orthonormal columns) with eigvals [K, r] >= 0, and lam_perp [K] >= 0 (variance off
    the span of each basis; None: 0). r = 0 (bases=None) gives isotropic components lam_perp_i I."""

    def __init__(self, log_weights, means, bases=None, eigvals=None, lam_perp=None, *, orthonormalize: bool = False):
        """orthonormalize=True replaces each basis by the orthonormal basis of its span (otherwise bases
        whose columns are not orthonormal to their dtype's rounding are refused). Float16 / bfloat16
        parameters are kept as storage (the op computes in float32)."""
        super().__init__()
        state = self.checked_state(log_weights, means, bases, eigvals, lam_perp, orthonormalize=orthonormalize)
        for name, t in state.items():
            self.register_buffer(name, t)
        self._refresh_center()

    @staticmethod
    def checked_state(log_weights, means, bases=None, eigvals=None, lam_perp=None, *,
                      orthonormalize: bool = False) -> dict:
        """The one check of a GMM's parameters (constructor, from_state_dict, load_state_dict): shapes,
        dtypes, d >= 1, finite means and bases, eigvals and lam_perp finite and >= 0, valid log-weights,
        orthonormal bases. Returns contiguous copies in means' dtype that share no memory with the
        arguments (bases [K, d, 0] and eigvals [K, 0] for r = 0, lam_perp [K])."""
        check_tensor("means", means, ndim=2, dtypes=FLOAT_DTYPES)
        K, d = means.shape
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
        meta.check_components(log_weights, means, bases, eigvals, lam_perp, dtypes=FLOAT_DTYPES)
        state = {"log_weights": owned(log_weights, dt), "means": owned(means), "bases": owned(bases, dt),
                 "eigvals": owned(eigvals, dt), "lam_perp": owned(lam_perp, dt)}
        if orthonormalize:
            state["bases"] = orthonormalize_columns(state["bases"])
        ops.check_values(**state)
        check_orthonormal("bases", state["bases"])
        return state

    def _rows(self):
        return self.means

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loading checks and copies exactly as the constructor does, before anything is written.
        keys = [prefix + name for name in ("log_weights", "means", "bases", "eigvals", "lam_perp")]
        if all(k in state_dict for k in keys):
            state_dict.update(zip(keys, self.checked_state(*(state_dict[k] for k in keys)).values()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_center()

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
        return ops.log_weight_norm(self.log_weights, self.n_components)

    def partial(self, x, sigma, *, score=False, return_weights=False, center=None):
        s = self._sigma(x, sigma)
        bases, eig = (self.bases, self.eigvals) if self.rank > 0 else (None, None)
        return call_op(torch.ops.gsa.gmm_forward, x, self.log_weights, self.means, bases, eig, self.lam_perp, s,
                       self.center if center is None else center, score, return_weights)

    def posterior(self, x, sigma) -> torch.Tensor:
        """Posterior component probabilities w [B, K] (docs/math.md section 3)."""
        return self.partial(x, sigma, return_weights=True)[2]

    @classmethod
    def from_state_dict(cls, state_dict) -> "GMM":
        """A new model from a state_dict(), checked and copied as by the constructor."""
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


class DeltaMixture(Mixture):
    """The training set as a mixture of deltas (docs/math.md section 3): points [N, ...] (float32/float64, or
    float16/bfloat16 storage to halve memory; accumulation is float32) and optional log-weights [N]
    (None: uniform). Its denoiser is the exact optimal denoiser of the empirical distribution."""

    def __init__(self, points, log_weights=None):
        super().__init__()
        for name, t in self.checked_state(points, log_weights).items():
            self.register_buffer(name, t)
        self._refresh_center()

    @staticmethod
    def checked_state(points, log_weights=None) -> dict:
        """The one check of a training set (constructor, from_state_dict, load_state_dict): shapes, dtypes,
        N >= 1, d >= 1, finite points, valid log-weights (None: uniform). Returns contiguous copies
        (points as [N, d]) that share no memory with the arguments."""
        check_tensor("points", points, dtypes=FLOAT_DTYPES)
        if points.dim() < 2:
            raise ValueError(f"points must have shape [N, ...] with at least one data dimension, "
                             f"got {tuple(points.shape)}")
        if points.shape[0] == 0:
            raise ValueError("points must hold at least one point (N >= 1), got N = 0")
        pts = points.reshape(points.shape[0], -1)
        meta.check_components(log_weights, pts, means_name="points", dtypes=FLOAT_DTYPES)
        state = {"points": owned(pts), "log_weights": None if log_weights is None else owned(log_weights)}
        ops.check_values(state["log_weights"], state["points"], means_name="points")
        return state

    def _rows(self):
        return self.points

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checked and copied as by the constructor, before anything is written. A state without
        # log-weights is a uniform training set, as log_weights=None is for the constructor and
        # from_state_dict (the state of a uniform model has no log_weights entry).
        key = prefix + "points"
        if key not in state_dict:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        state = self.checked_state(state_dict[key], state_dict.pop(prefix + "log_weights", None))
        state_dict[key] = state["points"]
        old_log_weights, errors = self.log_weights, len(error_msgs)
        self._buffers["log_weights"] = None  # so that neither a present nor an absent entry is an error
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            self._buffers["log_weights"] = state["log_weights"] if len(error_msgs) == errors else old_log_weights
        self._refresh_center()

    @property
    def n_points(self) -> int:
        return self.points.shape[0]

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def extra_repr(self) -> str:
        return f"n_points={self.n_points}, dim={self.dim}, dtype={self.points.dtype}"

    def log_weight_norm(self):
        return ops.log_weight_norm(self.log_weights, self.n_points)

    def partial(self, x, sigma, *, score=False, return_weights=False, center=None):
        if return_weights:
            raise ValueError("return_weights: DeltaMixture does not return [B, N] posterior weights")
        s = self._sigma(x, sigma)
        out, log_z = call_op(torch.ops.gsa.delta_mixture_forward, x, self.points, self.log_weights, s,
                             self.center if center is None else center, score)
        return out, log_z, None

    @classmethod
    def from_state_dict(cls, state_dict) -> "DeltaMixture":
        """A new model from a state_dict(), checked and copied as by the constructor; without a
        log_weights entry the weights are uniform."""
        return cls(state_dict["points"], state_dict.get("log_weights"))
