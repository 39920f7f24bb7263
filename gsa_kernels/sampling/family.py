"""Class-conditional Gaussians: one GaussianModel per class, applied per sample in one call.

A batch whose samples belong to different classes teleports (or denoises) with each sample's own
Gaussian: mean, basis and eigenvalues are gathered per sample and applied with batched matmuls
(docs/math.md section 2.1: mu + f(lam_perp) (x - mu) + U [(f(lam) - f(lam_perp)) * U^T (x - mu)]). There is no host
synchronisation (labels are never read on the host), so the call is CUDA-graph capturable; the gathered
bases are materialised in chunks of at most `max_gather_elements` numbers to bound memory.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validation import as_sigma, check_nonneg, check_tensor
from ..gaussian.reference import f_denoise as _f_denoise, f_score as _f_score, f_teleport as _f_teleport


class GaussianFamily(nn.Module):
    """C Gaussians with a common dimension d and rank r: means [C, d], bases [C, d, r], eigvals [C, r],
    lam_perp [C]. Classes of lower rank are zero-padded (a zero basis column is an exact no-op)."""

    def __init__(self, means: torch.Tensor, bases: torch.Tensor, eigvals: torch.Tensor, lam_perp=0.0,
                 max_gather_elements: int = 1 << 25):
        super().__init__()
        check_tensor("means", means, ndim=2)
        check_tensor("bases", bases, ndim=3, device=means.device)
        check_tensor("eigvals", eigvals, ndim=2, device=means.device)
        c, d = means.shape
        if bases.shape[:2] != (c, d):
            raise ValueError(f"bases must have shape [C, d, r] = [{c}, {d}, r], got {tuple(bases.shape)}")
        if eigvals.shape != (c, bases.shape[2]):
            raise ValueError(f"eigvals must have shape [C, r] = [{c}, {bases.shape[2]}], got {tuple(eigvals.shape)}")
        lam_perp = torch.as_tensor(lam_perp, dtype=means.dtype, device=means.device)
        if lam_perp.dim() == 0:
            lam_perp = lam_perp.expand(c)
        if lam_perp.shape != (c,):
            raise ValueError(f"lam_perp must be a number or have shape [C] = [{c}], got {tuple(lam_perp.shape)}")
        check_nonneg("eigvals", eigvals)
        check_nonneg("lam_perp", lam_perp)
        self.register_buffer("means", means.contiguous())
        self.register_buffer("bases", bases.to(means.dtype).contiguous())
        self.register_buffer("eigvals", eigvals.to(means.dtype).contiguous())
        self.register_buffer("lam_perp", lam_perp.to(means.dtype).contiguous())
        self.max_gather_elements = int(max_gather_elements)

    @classmethod
    def from_models(cls, models, **kwargs) -> "GaussianFamily":
        """Stack GaussianModels (same d; ranks may differ and are zero-padded to the largest)."""
        models = list(models)
        if not models:
            raise ValueError("models must hold at least one GaussianModel")
        d = models[0].mean.shape[0]
        if any(m.mean.shape[0] != d for m in models):
            raise ValueError("models must all have the same dimension d")
        r = max(m.basis.shape[1] for m in models)
        dtype = models[0].mean.dtype
        bases, eigvals = [], []
        for m in models:
            pad = r - m.basis.shape[1]
            bases.append(torch.nn.functional.pad(m.basis.to(dtype), (0, pad)))
            eigvals.append(torch.nn.functional.pad(m.eigvals.to(dtype), (0, pad)))
        return cls(torch.stack([m.mean.to(dtype) for m in models]), torch.stack(bases), torch.stack(eigvals),
                   torch.stack([m.lam_perp.to(dtype).reshape(()) for m in models]), **kwargs)

    @classmethod
    def fit(cls, data: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, rank: int | None = None,
            **kwargs) -> "GaussianFamily":
        """One GaussianModel.fit per class of `labels` ([N] integers in [0, num_classes))."""
        from ..gaussian.model import GaussianModel

        check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32))
        if labels.shape[0] != data.shape[0]:
            raise ValueError(f"labels must have shape [N] = [{data.shape[0]}], got {tuple(labels.shape)}")
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        return cls.from_models([GaussianModel.fit(data[labels == c], rank=rank) for c in range(num_classes)],
                               **kwargs)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def __getitem__(self, c: int):
        from ..gaussian.model import GaussianModel

        return GaussianModel(self.means[c], self.bases[c], self.eigvals[c], self.lam_perp[c])

    # -- per-sample ops -------------------------------------------------------------------------
    def _check(self, x, labels):
        check_tensor("x", x)
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape [B, ...] with prod(...) = d = {self.dim}, got {tuple(x.shape)}")
        check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32), device=x.device)
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"labels must have shape [B] = [{x.shape[0]}], got {tuple(labels.shape)}")
        if labels.device.type == "cpu" and labels.numel() and not bool(
                ((labels >= 0) & (labels < self.num_classes)).all()):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")

    def _map(self, x, labels, f, add_mean: bool, *sq_sigmas):
        ct = torch.float64 if torch.float64 in (x.dtype, self.means.dtype) else torch.float32
        d, r = self.dim, self.bases.shape[2]
        x2 = x.reshape(x.shape[0], d).to(ct)
        out = torch.empty_like(x2)
        chunk = max(1, self.max_gather_elements // max(d * r, 1))
        for start in range(0, x.shape[0], chunk):
            sl = slice(start, start + chunk)
            lab = labels[sl].long()
            mu, u = self.means[lab].to(ct), self.bases[lab].to(ct)           # [b, d], [b, d, r]
            sq = [s[sl].to(ct).unsqueeze(1) for s in sq_sigmas]             # [b, 1] each
            f_modes = f(self.eigvals[lab].to(ct), *sq)                     # [b, r]
            f_perp = f(self.lam_perp[lab].to(ct).unsqueeze(1), *sq)       # [b, 1]
            xc = x2[sl] - mu
            c = torch.bmm(xc.unsqueeze(1), u).squeeze(1)                   # U^T (x - mu)
            y = f_perp * xc + torch.bmm(u, ((f_modes - f_perp) * c).unsqueeze(2)).squeeze(2)
            out[sl] = y + mu if add_mean else y
        return out.to(x.dtype).reshape(x.shape)

    def _sigma_sq(self, name, sigma, x, allow_zero=False):
        return as_sigma(name, sigma, x.shape[0], x.device, dtype=torch.float64, allow_zero=allow_zero) ** 2

    def denoise(self, x: torch.Tensor, sigma, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample Gaussian denoiser D_{labels[b]}(x_b; sigma_b)."""
        self._check(x, labels)
        return self._map(x, labels, _f_denoise, True, self._sigma_sq("sigma", sigma, x))

    def score(self, x: torch.Tensor, sigma, labels: torch.Tensor) -> torch.Tensor:
        self._check(x, labels)
        return self._map(x, labels, _f_score, False, self._sigma_sq("sigma", sigma, x))

    def teleport(self, x: torch.Tensor, sigma_from, sigma_to, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample exact PF-ODE solution of each sample's class Gaussian from sigma_from to sigma_to."""
        self._check(x, labels)
        return self._map(x, labels, _f_teleport, True, self._sigma_sq("sigma_from", sigma_from, x),
                           self._sigma_sq("sigma_to", sigma_to, x, allow_zero=True))

    def for_labels(self, labels: torch.Tensor) -> "LabeledGaussians":
        """Bind labels: the result has .teleport(x, s0, s1) / .denoise(x, sigma) / .score and can be passed as
        `gaussian=` to the samplers or as the denoiser (analytic class-conditional sampling)."""
        return LabeledGaussians(self, labels)


class LabeledGaussians:
    """A GaussianFamily with fixed per-sample labels: the single-Gaussian interface."""

    def __init__(self, family: GaussianFamily, labels: torch.Tensor):
        self.family, self.labels = family, labels

    def teleport(self, x, sigma_from, sigma_to):
        return self.family.teleport(x, sigma_from, sigma_to, self.labels)

    def denoise(self, x, sigma):
        return self.family.denoise(x, sigma, self.labels)

    def score(self, x, sigma):
        return self.family.score(x, sigma, self.labels)
