"""python -m gsa_kernels.selftest: passes on this machine and fails on a broken kernel."""
import json

import pytest
import torch

from gsa_kernels import selftest
from gsa_kernels.gaussian import cuda as gcuda
from gsa_kernels.gaussian import ops as gops
from gsa_kernels.mixture import ops as mops

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--dtypes", "float32,float16", "--seed", "3"]


def test_selftest_passes_on_cpu(tmp_path, capsys):
    out = tmp_path / "selftest.json"
    assert selftest.main(["--backends", "cpu", "--json", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "gaussian_denoise" in text and "FAIL" not in text
    payload = json.loads(out.read_text())
    assert payload["passed"] and payload["seed"] == 3
    ops = {r["op"] for r in payload["rows"]}
    assert {"project", "gaussian_denoise", "gaussian_score", "teleport", "gmm_forward denoise",
            "gmm_forward score", "gmm_forward log_prob", "gmm_forward weights", "delta_mixture_forward denoise",
            "GaussianModel.denoise"} <= ops
    assert {r["dtype"] for r in payload["rows"]} == {"float32", "float16"}
    assert all(0 <= r["error"] <= r["tolerance"] for r in payload["rows"])


def _scaled(fn, factor):
    def broken(*args, **kwargs):
        return fn(*args, **kwargs) * factor
    return broken


@pytest.mark.parametrize("target", ["gaussian_score", "delta_mixture_forward"])
def test_selftest_fails_on_a_broken_kernel(monkeypatch, capsys, target):
    if target == "gaussian_score":  # 1e-3 relative error: above the float32 bound, below float16's
        monkeypatch.setattr(gops, "gaussian_score", _scaled(gops.gaussian_score, 1.0 + 1e-3))
    else:  # one output element never written (stays NaN)
        real = mops.delta_mixture_forward

        def forgets_one(*args, **kwargs):
            res = real(*args, **kwargs)
            res.out.view(-1)[-1] = float("nan")
            return res

        monkeypatch.setattr(mops, "delta_mixture_forward", forgets_one)
    assert selftest.main(["--backends", "cpu", *FAST]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.endswith("FAIL") or "FAIL  (" in line]
    if target == "gaussian_score":
        assert len(failed) == 1 and failed[0].startswith("gaussian_score") and "float32" in failed[0]
    else:
        assert {line.split()[0] for line in failed} == {"delta_mixture_forward"}
        assert all("non-finite" in line for line in failed)


def test_selftest_reports_an_exception_as_error(monkeypatch, capsys):
    def raises(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(gops, "teleport", raises)
    assert selftest.main(["--backends", "cpu", *FAST]) == 1
    text = capsys.readouterr().out
    assert "ERROR  (RuntimeError: kernel launch failed)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter backend: CPU machines")
def test_selftest_interpreter_backend_in_process(monkeypatch):
    """The CUDA kernel functions under the Triton interpreter (conftest sets TRITON_INTERPRET=1), float32 only,
    and a broken Triton wrapper is caught there."""
    assert selftest.main(["--backends", "interpreter", "--dtypes", "float32", "--seed", "1"]) == 0
    monkeypatch.setattr(gcuda, "project_cuda", _scaled(gcuda.project_cuda, 1.0 + 1e-4))
    assert selftest.main(["--backends", "interpreter", "--dtypes", "float32", "--seed", "1"]) == 1


def test_selftest_argument_errors():
    with pytest.raises(SystemExit):
        selftest.main(["--backends", "tpu"])
    with pytest.raises(SystemExit):
        selftest.main(["--dtypes", "int8"])
