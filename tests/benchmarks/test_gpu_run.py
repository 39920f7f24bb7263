"""benchmarks/gpu_run.sh (the one-shot GPU run) without a GPU, and its kernel table reader."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_kernel_report as report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for real")
def test_gpu_run_without_gpu_says_so_and_exits_cleanly_before_building():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stdout
    assert "=== build" not in proc.stdout and "summary" not in proc.stdout


class _Kernel:
    def __init__(self, n_regs, n_spills, shared, warps, loaded=True):
        self.metadata = types.SimpleNamespace(shared=shared, num_warps=warps, num_stages=3)
        self._values = (n_regs, n_spills)
        if loaded:
            self.n_regs, self.n_spills = n_regs, n_spills

    def _init_handles(self):  # Triton loads the binary (and learns its registers) on first launch
        self.n_regs, self.n_spills = self._values


def _jit(**attrs):
    fn = types.SimpleNamespace(src="def k(): pass", **attrs)
    return fn


@pytest.mark.parametrize("layout", ["3.9", "3.6", "3.2", "legacy"])
def test_kernel_report_reads_every_triton_cache_layout(monkeypatch, layout):
    k1, k2 = _Kernel(128, 9, 1024, 8), _Kernel(96, 0, 0, 4, loaded=False)
    cache = {"key-a": k1, "key-b": k2}
    if layout == "3.9":    # (kernel_cache, kernel_key_cache, target, backend, binder)
        fn = _jit(device_caches={0: (cache, {}, "target", "backend", None)})
    elif layout == "3.6":  # (kernel_cache, target, backend, binder) in some 3.x releases
        fn = _jit(device_caches={0: (cache, "target", "backend", None)})
    elif layout == "3.2":
        fn = _jit(device_caches={0: (cache, "target", "backend")})
    else:                  # Triton 2.x: JITFunction.cache[device]
        fn = _jit(cache={0: cache})
    autotuned = types.SimpleNamespace(fn=fn)  # an @autotune wrapper around the JITFunction
    module = types.ModuleType("fake_kernels")
    module.my_kernel = autotuned
    module.not_a_kernel = 3
    monkeypatch.setitem(sys.modules, "fake_kernels", module)
    monkeypatch.setattr(report, "KERNEL_MODULES", ("fake_kernels",))
    props = {"name": "GPU", "sm_count": 132, "regs_per_sm": 65536, "shared_per_sm": 233472, "threads_per_sm": 2048}
    rows = report.collect(props)
    assert [(r["kernel"], r["key"], r["n_regs"], r["n_spills"], r["shared_bytes"]) for r in rows] == \
        [("my_kernel", "key-a", 128, 9, 1024), ("my_kernel", "key-b", 96, 0, 0)]
    # 128 registers x 8 warps = 32768 per CTA: two CTAs fit 65536 registers; 96 x 4 warps: five.
    assert [r["ctas_per_sm"] for r in rows] == [2, 5]
    md = report.markdown({"device": props, "kernels": rows})
    assert "1 with register spills" in md and "| fake_kernels.my_kernel | 128 | 9 | 1024 | 8 | 3 | 2 |" in md


def test_kernel_report_wraps_a_module_run_and_merges(tmp_path, monkeypatch):
    """The wrapper runs the module in-process, keeps its exit status and adds its kernels to the JSON."""
    mod = tmp_path / "exit_three.py"
    mod.write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(report, "collect", lambda props: [{"kernel": "k", "key": "a", "module": "m", "n_regs": 1,
                                                           "n_spills": 0, "shared_bytes": 0, "num_warps": 1,
                                                           "num_stages": 1, "ctas_per_sm": None}])
    out = tmp_path / "kernels.json"
    assert report.main(["--json", str(out), "--", "exit_three"]) == 3
    assert report.main(["--json", str(out), "--", "exit_three"]) == 3
    assert len(json.loads(out.read_text())["kernels"]) == 1  # the same specialisation is listed once
    assert report.main(["--render", str(out)]) == 0
    assert "| m.k | 1 | 0 |" in out.with_suffix(".md").read_text()
