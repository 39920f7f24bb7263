"""Loads the compiled op library (libgsa_ops.so) that declares torch.ops.gsa.* and its CPU kernels.

The library is built on the LibTorch stable ABI, so one build loads in every torch from the version
it targets (2.10) on. If it still fails to load, the ImportError names the torch it was built against
(stamped at build time in _build_info.py), the running torch, and the rebuild command.
"""
from __future__ import annotations

import glob
import os
import sys

import torch

_LOADED: str | None = None

REBUILD_HINT = (
    "Rebuild it against the installed torch: `pip install --no-build-isolation --force-reinstall gsa_kernels` "
    "(from a source tree: `pip install --no-build-isolation .`)."
)


def _candidates() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    dirs = [here] + [os.path.join(p, "gsa_kernels") for p in sys.path if p]
    env = os.environ.get("GSA_KERNELS_LIBRARY")
    if env:  # an explicit path is the only candidate: never fall back silently to another build
        return [env]
    found: list[str] = []
    for d in dirs:
        found += sorted(glob.glob(os.path.join(d, "libgsa_ops*.so")))
    return found


def build_info() -> dict[str, str]:
    """What the op library was built against (empty if the build stamp is missing)."""
    try:
        from . import _build_info
    except ImportError:
        return {}
    return {"torch_build_version": _build_info.TORCH_BUILD_VERSION, "torch_min_version": _build_info.TORCH_MIN_VERSION}


def load_library() -> str:
    """Load libgsa_ops once; returns its path."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    paths = [p for p in _candidates() if os.path.isfile(p)]
    if not paths:
        where = os.environ.get("GSA_KERNELS_LIBRARY") or "beside the gsa_kernels package"
        raise ImportError(
            f"gsa_kernels: the compiled op library libgsa_ops.so was not found ({where}). Build the package "
            "with `pip install --no-build-isolation .` in an environment that has torch installed."
        )
    try:
        torch.ops.load_library(paths[0])
    except OSError as err:
        info = build_info()
        built = info.get("torch_build_version", "unknown (no build stamp)")
        minimum = info.get("torch_min_version", "2.10")
        cause = err.__cause__ or err
        raise ImportError(
            f"gsa_kernels: could not load the op library {paths[0]}: {cause}. It was built against torch {built} "
            f"for torch >= {minimum}; the running torch is {torch.__version__}. {REBUILD_HINT}"
        ) from err
    _LOADED = paths[0]
    return _LOADED
