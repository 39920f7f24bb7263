"""GaussianModel: the Gaussian data model G = (mu, U, lam, lam_perp) as an nn.Module (docs/math.md section 2)."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .. import frames
from .._core.dtypes import compute_dtype
from .._validation import FLOAT_DTYPES, check_orthonormal, check_tensor, owned
from .._validation import orthonormalize as _orthonormalize
from . import meta, ops


class GaussianModel(nn.Module):
    """A Gaussian fitted to data: mean [d], orthonormal basis [d, r], eigvals [r] >= 0, lam_perp >= 0.

    All methods take x of shape [B, ...] (prod(...) = d) and return that shape; sigma is a number or a
    [B] tensor. The buffers travel with .to() and state_dict().
    """

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, eigvals: torch.Tensor, lam_perp=0.0, *,
                 orthonormalize: bool = False):
        """orthonormalize=True replaces basis by the orthonormal basis of its span (otherwise a basis whose
        columns are not orthonormal to its dtype's rounding is refused). Float16 / bfloat16 parameters
        are kept as storage (the ops compute in float32), so a .half() model's state loads back."""
        super().__init__()
        for name, t in self.checked_state(mean, basis, eigvals, lam_perp, orthonormalize=orthonormalize).items():
            self.register_buffer(name, t)

    @staticmethod
    def checked_state(mean, basis, eigvals, lam_perp=0.0, *, orthonormalize: bool = False) -> dict:
        """The one check of a Gaussian's parameters (constructor, from_state_dict, load_state_dict): shapes,
        dtypes, finite mean and basis, eigvals and lam_perp finite and >= 0, orthonormal basis. Returns
        contiguous copies in mean's dtype that share no memory with the arguments."""
        meta.check_parameters(mean, basis, eigvals, dtypes=FLOAT_DTYPES)
        if isinstance(lam_perp, torch.Tensor):
            check_tensor("lam_perp", lam_perp, dtypes=FLOAT_DTYPES, device=mean.device)
            if lam_perp.numel() != 1:
                raise ValueError(f"lam_perp must be a number or a one-element tensor, got shape {tuple(lam_perp.shape)}")
        elif not isinstance(lam_perp, numbers.Real) or isinstance(lam_perp, bool):
            raise TypeError(f"lam_perp must be a number or a tensor, got {type(lam_perp).__name__}")
        dt = mean.dtype
        state = {"mean": owned(mean), "basis": owned(basis, dt), "eigvals": owned(eigvals, dt),
                 "lam_perp": owned(torch.as_tensor(lam_perp, device=mean.device).reshape(()), dt)}
        if orthonormalize:
            state["basis"] = _orthonormalize(state["basis"])
        ops.check_values(**state)
        check_orthonormal("basis", state["basis"])
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loading checks and copies exactly as the constructor does, before anything is written.
        keys = [prefix + name for name in ("mean", "basis", "eigvals", "lam_perp")]
        if all(k in state_dict for k in keys):
            state_dict.update(zip(keys, self.checked_state(*(state_dict[k] for k in keys)).values()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        b = self._buffers  # one dict read instead of four Module.__getattr__ calls (per-call host cost)
        return b["mean"], b["basis"], b["eigvals"], b["lam_perp"]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Eigenbasis coefficients c = U^T (x - mu), [B, r]."""
        return ops.project(x, self.mean, self.basis)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Optimal denoiser E[x0 | x] at noise level sigma."""
        return ops.gaussian_denoise(x, *self._args(), sigma)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """grad_x log p_sigma(x)."""
        return ops.gaussian_score(x, *self._args(), sigma)

    def teleport(self, x: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
        """Exact PF-ODE solution of the Gaussian from sigma_from to sigma_to (VE frame)."""
        return ops.teleport(x, *self._args(), sigma_from, sigma_to)

    def teleport_frame(self, x: torch.Tensor, frm, to, frame: str = "vp") -> torch.Tensor:
        """Teleport a sample given in another frame (docs/math.md section 1): `frm`/`to` are alpha_bar for
        frame="vp" (DDPM/DDIM latents), t for frame="flow" (rectified flow), sigma for "ve"."""
        s0, a0 = frames.frame_sigma_and_scale(frame, frm)
        s1, a1 = frames.frame_sigma_and_scale(frame, to)
        return frames.from_ve(self.teleport(frames.to_ve(x, a0), s0, s1), a1)

    def denoise_along_teleport(self, x: torch.Tensor, sigma_from, sigma) -> torch.Tensor:
        """docs/math.md section 2.2: the denoised estimate D(x(sigma); sigma) on the analytic trajectory from x at sigma_from."""
        return self.denoise(self.teleport(x, sigma_from, sigma), sigma)

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p_sigma(x) of the noised Gaussian, [B]: log N(x; mu, U diag(lam + s^2) U^T
        + (lam_perp + s^2)(I - U U^T)), with c = U^T (x - mu) from the project op."""
        ct = compute_dtype(self.mean)
        d, r = self.dim, self.rank
        x2 = x.reshape(x.shape[0], -1).to(ct)
        c = ops.project(x2, self.mean, self.basis).to(ct)
        s2 = torch.as_tensor(sigma, dtype=ct, device=x.device).reshape(-1, 1) ** 2
        lam = self.eigvals.to(ct) + s2                                   # [B, r]
        maha = (c * c / lam).sum(1)
        logdet = torch.log(lam).sum(1)
        if r < d:
            lam_perp = self.lam_perp.to(ct) + s2.squeeze(1)
            xc = x2 - self.mean.to(ct)
            off_subspace = ((xc * xc).sum(1) - (c * c).sum(1)).clamp_min(0)
            maha = maha + off_subspace / lam_perp
            logdet = logdet + (d - r) * torch.log(lam_perp)
        return -0.5 * (maha + logdet + d * math.log(2 * math.pi))

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
        """A new model from a state_dict(), checked and copied as by the constructor."""
        return cls(state_dict["mean"], state_dict["basis"], state_dict["eigvals"], state_dict["lam_perp"])

    @classmethod
    def fit(cls, data, rank: int | None = None, *, method: str = "auto", n_passes: int = 10,
            oversampling: int = 10, tol: float | None = 1e-5, seed: int = 0, device=None, dtype=torch.float32,
            sharded: bool = False, group=None, verbose: bool = False) -> "GaussianModel":
        """Fit mean and covariance eigenbasis to data (unbiased covariance, divides by N - 1).

        data: a tensor [N, ...] or an iterable of such batches (a DataLoader yielding tensors or
        (tensor, label) tuples). Moments are accumulated in float64 and centred per batch, then merged
        (Chan et al.), so float32 cancellation never eats the small-eigenvalue tail (docs/math.md section 3.1).
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
