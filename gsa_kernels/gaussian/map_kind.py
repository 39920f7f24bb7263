"""Ids of the Gaussian maps, one encoding for every kernel.

The C++ kernels use the same values (csrc/gaussian/map_kind.h: enum class with Denoise = 1, Score = 2,
Teleport = 3); tests/ops/test_map_kind.py checks that the two agree. PROJECT (0) exists only in the
Triton kernels, where the projection c = U^T (x - mu) is the first GEMM with no per-mode factor.
"""
PROJECT = 0
DENOISE = 1
SCORE = 2
TELEPORT = 3

# torch.ops.gsa op name -> map id.
OP_MAP_KINDS = {"gaussian_denoise": DENOISE, "gaussian_score": SCORE, "teleport": TELEPORT}
