"""End-to-end demo: train a small EDM denoiser on scikit-learn's digits and measure the network evaluations
that analytical teleportation saves at equal sample quality. Run `python -m gsa_kernels.demo`.

Submodules: data (loading and splits), model (the EDM-preconditioned MLP), train (EDM loss, cached
checkpoint), metrics (Frechet distances, feature classifier), evaluate (sampling sweep and equal-quality
accounting), report (figures and markdown), pipeline (the whole run)."""
from .pipeline import build_parser, main, run

__all__ = ["run", "main", "build_parser"]
