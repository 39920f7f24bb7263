"""The Gaussian data model and its closed-form ops (docs/math.md section 2).

ops.py: the Python API; meta.py: the argument check of the fake and CUDA kernels; cuda.py and
triton_gaussian.py: the GPU kernels; maps.py: the maps in plain PyTorch; map_kind.py: the map ids;
model.py: GaussianModel. reference.py is the float64 oracle of the tests and benchmarks (not imported here).
"""
from .ops import check_values, gaussian_denoise, gaussian_score, project, teleport

__all__ = ["project", "gaussian_denoise", "gaussian_score", "teleport", "check_values"]
