"""The Triton launch configurations compile for sm_90 without register spills, specialised as real launches
of contiguous tensors are (16-byte-aligned pointers, d divisible by 16), and the resource table is written.
The fast test compiles one configuration of each kernel; the slow one every tile-table entry in every
precision mode (several minutes on a small CPU) and writes the table to a temporary directory."""
import json
import os
import subprocess
import sys

import pytest

H100_SHARED_BYTES = 227 * 1024


def _run(code: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(rows):
    for r in rows:
        assert r["registers"] > 0, r
        assert r["spill_bytes"] == 0, r
        assert 0 < r["shared_bytes"] <= H100_SHARED_BYTES or r["shared_bytes"] == 0, r
        assert r["ctas_per_sm"] >= 1, r


def test_one_configuration_per_kernel_is_spill_free():
    rows = _run(
        "import json\n"
        "from gsa_kernels import triton_aot\n"
        "from gsa_kernels.gaussian import triton_gaussian as G\n"
        "from gsa_kernels.mixture import triton_mixture as M, triton_mixture_vjp as MV\n"
        "first = {}\n"
        "for mod in (G, M, MV):\n"
        "    for k, a in mod.aot_cases():\n"
        "        first.setdefault(k.fn.__name__, (k, a))\n"
        "print(json.dumps([triton_aot.resource_row(k, a, 90) for k, a in first.values()]))\n")
    assert {r["kernel"] for r in rows} == {"_project_scale_kernel", "_reconstruct_kernel", "_delta_partial_kernel",
                                          "_gmm_partial_kernel", "_delta_vjp_partial_kernel", "_gmm_vjp_partial_kernel"}
    _check(rows)


@pytest.mark.slow
def test_every_tile_table_entry_is_spill_free(tmp_path):
    stem = str(tmp_path / "aot_kernels_sm90")
    rows = _run("from gsa_kernels.triton_aot import table_main\n"
                f"raise SystemExit(table_main(['--arch', '90', '--out', {stem!r}]))\n")
    _check(rows)
    assert os.path.exists(stem + ".md") and json.load(open(stem + ".json")) == rows
