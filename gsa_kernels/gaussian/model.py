"""GaussianModel: the Gaussian data model G = (mu, U, lam, lam_perp) as an nn.Module (MATH.md section 2)."""
from __future__ import annotations

import torch
from torch import nn

from .. import frames
from .._validation import PARAM_DTYPES, check_finite, check_nonneg, check_tensor
from . import ops


class GaussianModel(nn.Module):
    """A Gaussian fitted to data: mean [d], orthonormal basis [d, r], eigvals [r] >= 0, lam_perp >= 0.

    All methods take x of shape [B, ...] (prod(...) = d) and return that shape; sigma is a number or a
    [B] tensor. The buffers travel with .to() and state_dict().
    """

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, eigvals: torch.Tensor, lam_perp=0.0):
        super().__init__()
        check_tensor("mean", mean, ndim=1, dtypes=PARAM_DTYPES)
        check_tensor("basis", basis, ndim=2, dtypes=PARAM_DTYPES, device=mean.device)
        check_tensor("eigvals", eigvals, ndim=1, dtypes=PARAM_DTYPES, device=mean.device)
        d, r = basis.shape
        if d != mean.shape[0]:
            raise ValueError(f"basis must have shape [d, r] with d = {mean.shape[0]} (from mean), got {tuple(basis.shape)}")
        if not 1 <= r <= d:
            raise ValueError(f"basis must have 1 <= r <= d = {d}, got r = {r}")
        if eigvals.shape[0] != r:
            raise ValueError(f"eigvals must have shape [r] = [{r}], got {tuple(eigvals.shape)}")
        lam_perp = torch.as_tensor(lam_perp, dtype=mean.dtype, device=mean.device).reshape(())
        self.register_buffer("mean", mean.contiguous())
        self.register_buffer("basis", basis.contiguous())
        self.register_buffer("eigvals", eigvals.to(mean.dtype).contiguous())
        self.register_buffer("lam_perp", lam_perp.to(mean.dtype))
        self._check_values()
        # Parameters are checked here and after load_state_dict, not on every call.
        self.register_load_state_dict_post_hook(lambda module, keys: module._check_values())

    def _check_values(self):
        check_finite("mean", self.mean)
        check_finite("basis", self.basis)
        check_nonneg("eigvals", self.eigvals)
        check_nonneg("lam_perp", self.lam_perp)

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, lam_perp={float(self.lam_perp):.4g}, dtype={self.mean.dtype}"

    # -- ops ---------------------------------------------------------------------------------
    def _args(self):
        return self.mean, self.basis, self.eigvals, self.lam_perp

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Eigenbasis coefficients c = U^T (x - mu), [B, r]."""
        return ops.project(x, self.mean, self.basis)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Optimal denoiser E[x0 | x] at noise level sigma."""
        return ops.gaussian_denoise(x, *self._args(), sigma, check_values=False)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """grad_x log p_sigma(x)."""
        return ops.gaussian_score(x, *self._args(), sigma, check_values=False)

    def teleport(self, x: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
        """Exact PF-ODE solution of the Gaussian from sigma_from to sigma_to (VE frame)."""
        return ops.teleport(x, *self._args(), sigma_from, sigma_to, check_values=False)

    def teleport_frame(self, x: torch.Tensor, frm, to, frame: str = "vp") -> torch.Tensor:
        """Teleport a sample given in another frame (MATH.md section 1): `frm`/`to` are alpha_bar for
        frame="vp" (DDPM/DDIM latents), t for frame="flow" (rectified flow), sigma for "ve"."""
        s0, a0 = frames.frame_sigma_and_scale(frame, frm)
        s1, a1 = frames.frame_sigma_and_scale(frame, to)
        return frames.from_ve(self.teleport(frames.to_ve(x, a0), s0, s1), a1)

    def denoise_along_teleport(self, x: torch.Tensor, sigma_from, sigma) -> torch.Tensor:
        """MATH.md 2.2: the denoised estimate D(x(sigma); sigma) on the analytic trajectory from x at sigma_from."""
        return self.denoise(self.teleport(x, sigma_from, sigma), sigma)

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p_sigma(x) of the noised Gaussian, [B] (unfused; for analysis)."""
        from . import reference

        ct = torch.float64 if self.mean.dtype == torch.float64 else torch.float32
        return reference.gaussian_log_prob(x.to(ct), self.mean.to(ct), self.basis.to(ct), self.eigvals.to(ct),
                                           self.lam_perp.to(ct), torch.as_tensor(sigma, dtype=ct, device=x.device))

    def sample(self, n: int, sigma=0.0, generator=None) -> torch.Tensor:
        """n draws from the (noised) Gaussian, [n, d]."""
        z = torch.randn(n, self.rank, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        x = self.mean + (z * torch.sqrt(self.eigvals)) @ self.basis.T
        if self.rank < self.dim and float(self.lam_perp) > 0:
            e = torch.randn(n, self.dim, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
            e = e - (e @ self.basis) @ self.basis.T
            x = x + torch.sqrt(self.lam_perp) * e
        if sigma:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state_dict) -> "GaussianModel":
        return cls(state_dict["mean"], state_dict["basis"], state_dict["eigvals"], state_dict["lam_perp"])

    @classmethod
    def fit(cls, data, rank: int | None = None, *, method: str = "auto", n_passes: int = 10,
            oversampling: int = 10, tol: float | None = 1e-5, seed: int = 0, device=None, dtype=torch.float32,
            sharded: bool = False, group=None, verbose: bool = False) -> "GaussianModel":
        """Fit mean and covariance eigenbasis to data (unbiased covariance, divides by N - 1).

        data: a tensor [N, ...] or an iterable of such batches (a DataLoader yielding tensors or
        (tensor, label) tuples). Moments are accumulated in float64, centred per batch and merged
        (Chan et al.), so float32 cancellation never eats the small-eigenvalue tail (docs/math.md 3.1).
        rank: keep the top `rank` modes; lam_perp is then the mean of the discarded eigenvalues.
        method: "full" (d x d scatter + eigh, one pass), "lowrank" (streamed randomized subspace iteration
        in O(d (rank + oversampling)) memory, at most n_passes passes; data must be re-iterable) or "auto"
        (full for d <= 4096 or rank None, else lowrank). seed fixes the low-rank probe vectors; tol stops
        the passes once every kept Ritz pair has ||C u - lam u|| <= tol * lam (None: all n_passes), which
        bounds the eigenvalue error by ~ tol^2 lam^2 / gap and the subspace angle by ~ tol lam / gap. sharded: each torch.distributed
        rank (of `group`) passes its own shard and all ranks get the fit of the union. verbose: progress.
        The fit's details (method, passes, low-rank residuals, sample count) are in `model.fit_info_`.
        See gsa_kernels.gaussian.fit and docs/fitting.md.
        """
        from .fit import fit_gaussian

        res = fit_gaussian(data, rank, method=method, n_passes=n_passes, oversampling=oversampling, tol=tol,
                           seed=seed, device=device, sharded=sharded, group=group, verbose=verbose)
        model = cls(res.mean[0].to(dtype), res.basis[0].to(dtype), res.eigvals[0].to(dtype),
                    res.lam_perp[0].to(dtype))
        model.fit_info_ = {"method": res.method, "n_passes": res.n_passes, "n_samples": int(res.count[0]),
                           "total_variance": float(res.trace[0]),
                           "residuals": None if res.residuals is None else res.residuals[0]}
        return model
