"""The op library loader: a library that cannot be loaded gives an ImportError that says what to do."""
import os
import subprocess
import sys

import torch

import gsa_kernels  # noqa: F401  (the library under test loads in this process)
from gsa_kernels import _library


def _import_with_library(path):
    env = dict(os.environ, GSA_KERNELS_LIBRARY=str(path))
    return subprocess.run([sys.executable, "-c", "import gsa_kernels"], env=env, capture_output=True, text=True,
                          timeout=120)


def test_unloadable_library_names_versions_and_rebuild(tmp_path):
    bad = tmp_path / "libgsa_ops.so"
    bad.write_bytes(b"\x7fELF this is not a shared object")
    proc = _import_with_library(bad)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("ImportError"), err
    assert str(bad) in err
    assert f"the running torch is {torch.__version__}" in err
    built = _library.build_info().get("torch_build_version", "unknown (no build stamp)")
    assert f"built against torch {built}" in err
    assert "pip install --no-build-isolation --force-reinstall gsa_kernels" in err


def test_missing_library_is_an_import_error(tmp_path):
    proc = _import_with_library(tmp_path / "missing" / "libgsa_ops.so")
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("ImportError") and "libgsa_ops.so was not found" in err, err


def test_build_stamp_names_a_supported_torch():
    info = _library.build_info()
    assert info, "the build did not install gsa_kernels/_build_info.py"
    major, minor = (int(v) for v in info["torch_build_version"].split(".")[:2])
    assert (major, minor) >= (2, 10)
    assert info["torch_min_version"] == "2.10"
