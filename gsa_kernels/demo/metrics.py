"""Sample quality: the Frechet distance between Gaussians fitted to two sets of vectors, in pixel space and
in the feature space of a small classifier trained on the same data (a digits-sized stand-in for FID's
Inception features)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of the rows of x, in float64, centred before the product."""
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"x must be [N >= 2, d], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("x has non-finite values (NaN or inf)")
    mu = a.mean(axis=0)
    c = a - mu
    return mu, c.T @ c / (a.shape[0] - 1)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2).

    tr((C1 C2)^1/2) is taken as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    C1^1/2 C2 C1^1/2 (same spectrum as C1 C2), which needs no non-symmetric matrix square root."""
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    eig = np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)
    fd = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * np.sum(np.sqrt(eig)))
    return max(fd, 0.0)


def frechet_distance(x, y) -> float:
    """Frechet distance between Gaussians fitted to the rows of x [N, d] and y [M, d]."""
    return frechet_distance_from_stats(*gaussian_stats(x), *gaussian_stats(y))


class DigitClassifier(nn.Module):
    """A small MLP classifier; its penultimate activations are the feature space of the feature FD."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 256, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, features), nn.SiLU())
        self.head = nn.Linear(features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(x.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, *, steps: int = 1500, batch_size: int = 128,
                     seed: int = 0, noise: float = 0.1) -> DigitClassifier:
    """Adam on cross-entropy; a little input noise makes the features smooth around the data, so that
    near-miss samples do not land in arbitrary parts of feature space."""
    if train_y is None:
        raise ValueError("train_y is None: the feature FD needs a labelled data set")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_classes = int(train_y.max()) + 1
    clf = DigitClassifier(train_x.shape[1], n_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, train_x.shape[0], (batch_size,), generator=g)
        x = train_x[idx] + noise * torch.randn(batch_size, train_x.shape[1], generator=g)
        loss = nn.functional.cross_entropy(clf(x), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(clf: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((clf(x).argmax(dim=1) == y).float().mean())


@dataclass
class QualityMeter:
    """Frechet distances of sample sets to a fixed reference set (the held-out split), in pixel space and,
    when a classifier is given, in its feature space. The reference statistics are computed once."""

    reference: torch.Tensor
    classifier: DigitClassifier | None = None

    def __post_init__(self):
        self._pixel_ref = gaussian_stats(self.reference)
        self._feature_ref = None
        if self.classifier is not None:
            with torch.no_grad():
                self._feature_ref = gaussian_stats(self.classifier.features(self.reference))

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("fd_pixel", "fd_feature") if self.classifier is not None else ("fd_pixel",)

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        flat = samples.reshape(samples.shape[0], -1).float().cpu()  # the classifier and statistics live on the CPU
        out = {"fd_pixel": frechet_distance_from_stats(*gaussian_stats(flat), *self._pixel_ref)}
        if self.classifier is not None:
            feats = self.classifier.features(flat)
            out["fd_feature"] = frechet_distance_from_stats(*gaussian_stats(feats), *self._feature_ref)
        return out
