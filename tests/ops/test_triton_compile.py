"""The Triton kernels compile for the A100 (sm_80), L40S / RTX 4090 (sm_89) and H100 (sm_90) even on a
machine without a GPU.

CI tests the kernels' arithmetic under TRITON_INTERPRET=1; this test proves the same kernels lower
through Triton's GPU pipeline (TTGIR, PTX, ptxas) for each architecture and fit its shared memory.
"""
import json
import os
import subprocess
import sys

import pytest

from gsa_kernels.triton_aot import DEFAULT_ARCHS, SHARED_BYTES_PER_BLOCK

pytestmark = [pytest.mark.matrix, pytest.mark.aot]


def test_triton_kernels_compile_for_sm80_sm89_sm90():
    assert DEFAULT_ARCHS == [80, 89, 90]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "gsa_kernels.triton_aot", "--arch", *map(str, DEFAULT_ARCHS)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"_project_scale_kernel", "_reconstruct_kernel", "_delta_partial_kernel", "_gmm_partial_kernel",
                "_delta_vjp_partial_kernel", "_gmm_vjp_partial_kernel"}
    for arch in DEFAULT_ARCHS:
        assert expected <= {r["kernel"] for r in results if r["arch"] == arch}, arch
    for r in results:
        assert 0 <= r["shared_bytes"] <= SHARED_BYTES_PER_BLOCK[r["arch"]], r
