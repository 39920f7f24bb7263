"""The Gaussian data model and its closed-form ops (docs/math.md section 2)."""
from . import reference
from .ops import gaussian_denoise, gaussian_score, project, teleport

__all__ = ["reference", "project", "gaussian_denoise", "gaussian_score", "teleport"]
