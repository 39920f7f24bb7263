"""Loads the compiled op library (libgsa_ops.so) that declares torch.ops.gsa.* and its CPU kernels."""
from __future__ import annotations

import glob
import os
import sys

import torch

_LOADED: str | None = None


def _candidates() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    dirs = [here] + [os.path.join(p, "gsa_kernels") for p in sys.path if p]
    env = os.environ.get("GSA_KERNELS_LIBRARY")
    found = [env] if env else []
    for d in dirs:
        found += sorted(glob.glob(os.path.join(d, "libgsa_ops*.so")))
    return found


def load_library() -> str:
    """Load libgsa_ops once; returns its path."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    paths = [p for p in _candidates() if os.path.isfile(p)]
    if not paths:
        raise ImportError(
            "gsa_kernels: the compiled op library libgsa_ops.so was not found. Build the package with "
            "`pip install --no-build-isolation .` in an environment that has torch installed."
        )
    torch.ops.load_library(paths[0])
    _LOADED = paths[0]
    return _LOADED
