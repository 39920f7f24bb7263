"""GaussianModel: the Gaussian data model G = (mu, U, lam, lam_perp) as an nn.Module (docs/math.md section 2)."""
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
        """Teleport a sample given in another frame (docs/math.md section 1): `frm`/`to` are alpha_bar for
        frame="vp" (DDPM/DDIM latents), t for frame="flow" (rectified flow), sigma for "ve"."""
        s0, a0 = frames.frame_sigma_and_scale(frame, frm)
        s1, a1 = frames.frame_sigma_and_scale(frame, to)
        return frames.from_ve(self.teleport(frames.to_ve(x, a0), s0, s1), a1)

    def denoise_along_teleport(self, x: torch.Tensor, sigma_from, sigma) -> torch.Tensor:
        """docs/math.md section 2.2: the denoised estimate D(x(sigma); sigma) on the analytic trajectory from x at sigma_from."""
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
    def fit(cls, data, rank: int | None = None, *, device=None, dtype=torch.float32) -> "GaussianModel":
        """Fit mean and covariance eigenbasis to data.

        data: a tensor [N, ...] or an iterable of such batches (a DataLoader yielding tensors or
        (tensor, label) tuples). Moments are accumulated in float64 and centred per batch, then merged
        (Chan et al.), so float32 cancellation never eats the small-eigenvalue tail (docs/math.md section 3.1).
        rank: keep the top `rank` modes; lam_perp is then the mean of the discarded eigenvalues.
        The covariance is the unbiased one (divides by N - 1).
        """
        n, mean, scatter = 0, None, None
        batches = [data] if isinstance(data, torch.Tensor) else data
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            check_tensor("data", batch)
            if batch.dim() < 2:
                raise ValueError(f"data batches must have shape [N, ...], got {tuple(batch.shape)}")
            xb = batch.reshape(batch.shape[0], -1)
            if device is not None:
                xb = xb.to(device)
            xb = xb.to(torch.float64)
            nb = xb.shape[0]
            if nb == 0:
                continue
            check_finite("data", xb)
            mb = xb.mean(0)
            cb = xb - mb
            sb = cb.T @ cb
            if mean is None:
                n, mean, scatter = nb, mb, sb
            else:
                if mb.shape != mean.shape:
                    raise ValueError(f"data batches disagree on d: {mean.shape[0]} then {mb.shape[0]}")
                delta = mb - mean
                total = n + nb
                mean = mean + delta * (nb / total)
                scatter = scatter + sb + torch.outer(delta, delta) * (n * nb / total)
                n = total
        if mean is None or n < 2:
            raise ValueError("data must hold at least 2 samples")
        d = mean.shape[0]
        if rank is not None and not 1 <= rank <= d:
            raise ValueError(f"rank must lie in [1, d = {d}], got {rank}")
        cov = scatter / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        r = d if rank is None else rank
        lam_perp = evals[r:].mean() if r < d else torch.zeros((), dtype=torch.float64, device=evals.device)
        return cls(mean.to(dtype), evecs[:, :r].contiguous().to(dtype), evals[:r].to(dtype), lam_perp.to(dtype))
