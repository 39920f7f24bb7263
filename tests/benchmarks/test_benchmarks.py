"""Smoke test of the microbenchmark suite (benchmarks/): tiny shapes, every family, the result files and
the JSON fields; plus the pieces whose mistakes would silently corrupt a table (error column, chunked
float64 mixture reference, speedups, CPU memory accounting)."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the benchmarks package lives at the repo root

from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks.cases import mixture as mixture_cases  # noqa: E402
from benchmarks.harness import memory, run  # noqa: E402

ROW_FIELDS = {
    "family", "op", "config", "config_str", "batch", "backend", "kind", "precision", "status", "reason",
    "median_s", "iqr_s", "runs", "timer", "first_call_s", "compile_s", "graph_s", "flops", "min_bytes",
    "in_bytes", "out_bytes", "tflops", "gbps", "pct_bw", "pct_flops", "roofline_pct", "peak_extra_bytes",
    "mem_vs_io", "rel_err", "err_rows", "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_papers",
    "vs_matmuls",
}
OVERHEAD_FIELDS = {"family", "op", "config", "batch", "backend", "status", "reason", "host_s", "median_s", "graph_s"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    payload = bench_main.main(["--shapes", "tiny", "--ops", "gaussian,mixture,overhead", "--no-compile",
                               "--min-time", "0.002", "--threads", "1", "--device", "cpu",
                               "--out", str(out), "--tag", "smoke"])
    return payload, out


def test_files_and_metadata(tiny_run):
    payload, out = tiny_run
    stem = out / f"{payload['env']['device_slug']}_{payload['env']['date']}_smoke"
    for suffix in (".json", ".md", ".png"):
        assert stem.with_suffix(suffix).is_file(), suffix
    data = json.loads(stem.with_suffix(".json").read_text())
    env = data["env"]
    assert env["torch"] == torch.__version__ and "triton" in env and env["device_type"] == "cpu"
    assert data["ceilings"]["copy"]["gbps"] > 0 and data["ceilings"]["matmul"]["ieee"]["tflops"] > 0
    md = stem.with_suffix(".md").read_text()
    assert "CPU numbers" in md and "| op | shape | B | backend |" in md and "## overhead" in md
    assert {r["family"] for r in data["rows"]} == {"gaussian", "mixture", "overhead"}


def test_rows(tiny_run):
    payload, _ = tiny_run
    rows = payload["rows"]
    ceil = payload["ceilings"]
    for r in rows:
        assert (OVERHEAD_FIELDS if r["family"] == "overhead" else ROW_FIELDS) <= set(r), r["backend"]
    gauss = [r for r in rows if r["family"] == "gaussian"]
    assert {r["op"] for r in gauss} == {"teleport", "denoise", "score"}
    assert {r["kind"] for r in gauss} == set(run.BACKEND_KINDS)
    for r in gauss:
        if r["kind"] == "compile":
            assert r["status"] == "skipped" and r["reason"] == "--no-compile"
            continue
        assert r["status"] == "ok", (r["backend"], r["reason"])
        assert r["median_s"] > 0 and r["runs"] >= 1
        assert r["gbps"] == pytest.approx(r["min_bytes"] / r["median_s"] / 1e9)
        assert r["pct_bw"] == pytest.approx(100 * r["gbps"] / ceil["copy"]["gbps"])
        assert r["peak_extra_bytes"] is None or r["peak_extra_bytes"] >= 0
        if r["kind"] == "matmuls":
            assert r["rel_err"] is None
        else:  # float32 against the float64 reference
            assert r["rel_err"] < (1e-4 if r["kind"] == "papers" else 1e-5), (r["op"], r["backend"], r["rel_err"])
    for r in (r for r in gauss if r["kind"] == "gsa"):
        eager = next(e for e in gauss if e["kind"] == "eager" and (e["op"], e["config_str"], e["batch"])
                     == (r["op"], r["config_str"], r["batch"]))
        assert r["speedup_vs_eager"] == pytest.approx(eager["median_s"] / r["median_s"])
        assert r["vs_matmuls"] is not None
    mix = [r for r in rows if r["family"] == "mixture"]
    assert {r["op"] for r in mix} == {"gmm", "delta"}
    for r in mix:
        assert r["status"] in ("ok", "skipped"), (r["backend"], r["reason"])
        if r["status"] == "ok" and r["kind"] != "matmuls":
            assert r["rel_err"] < 1e-4, (r["op"], r["backend"], r["rel_err"])
    overhead = {r["backend"]: r for r in rows if r["family"] == "overhead"}
    assert overhead["torch.ops.gsa"]["host_s"] > 0
    assert overhead["cuda graph replay"]["status"] == "skipped"
    assert overhead["cuda kernel, launch stubbed"]["host_s"] > 0


def test_error_column_catches_a_wrong_kernel():
    device = torch.device("cpu")
    x_ref = torch.randn(4, 16, dtype=torch.float64)
    case = run.Case(
        family="t", op="scale", config={"d": 16}, batch=4, flops=64, min_bytes=512, in_bytes=256, out_bytes=256,
        make_x=lambda: x_ref.float(), reference64=lambda x: 2 * x.double(), err_rows=4,
        backends=[run.Backend("gsa", "gsa", fn=lambda x: 2.02 * x),
                  run.Backend("eager", "eager", fn=lambda x: 2 * x)])
    opts = run.RunOptions(device=device, shape_set="tiny", min_time=0.001)
    ceilings = {"copy": {"gbps": 1.0}, "matmul": {"ieee": {"tflops": 1.0}}}
    rows = {r["backend"]: r for r in run.run_case(case, opts, ceilings)}
    assert rows["gsa"]["rel_err"] == pytest.approx(0.01, rel=1e-4)
    assert rows["eager"]["rel_err"] < 1e-7
    assert rows["gsa"]["speedup_vs_eager"] == pytest.approx(rows["eager"]["median_s"] / rows["gsa"]["median_s"])


def test_chunked_mixture_reference_is_exact():
    from gsa_kernels.mixture import reference

    g = torch.Generator().manual_seed(0)
    K, d, r = 7, 10, 3
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    lw = torch.randn(K, generator=g, dtype=torch.float64)
    means = torch.randn(K, d, generator=g, dtype=torch.float64)
    bases = torch.linalg.qr(torch.randn(K, d, r, generator=g, dtype=torch.float64))[0]
    eig = torch.rand(K, r, generator=g, dtype=torch.float64)
    lp = 0.1 * torch.rand(K, generator=g, dtype=torch.float64)
    params = (lw, means, bases, eig, lp)
    full = reference.gmm_denoise(x, *params, 0.7)
    merged = mixture_cases.merged_reference(
        lambda sl: reference.gmm_denoise(x, *(t[sl] for t in params), 0.7),
        lambda sl: reference.gmm_posterior(x, *(t[sl] for t in params), 0.7)[1], K, chunk=3)
    torch.testing.assert_close(merged, full, rtol=1e-12, atol=1e-12)


def test_cpu_peak_memory_counts_temporaries():
    x = torch.randn(512, 1024)  # 2 MiB
    peak, note = memory.peak_extra_bytes(lambda: (x * 2) + 1, torch.device("cpu"))
    if peak is None:
        pytest.skip(note)
    # One temporary plus the output: about 2 x 2 MiB.
    assert 1.8 * x.nbytes < peak < 2.6 * x.nbytes
