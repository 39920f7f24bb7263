"""Scale cases: low-rank Gaussian fits at latent-diffusion sizes, the training set streamed from disk, and the
GMM fit's EM question. `run(quick)` returns result rows; `python -m benchmarks.cases.scale [--quick]` writes
benchmarks/results/scale_<device>_<date>.json and .md.

Rows: case, time_s, peak_mem_bytes (growth of the peak resident set, VmHWM, of a fresh subprocess that runs
only the case, over its state after imports and data set-up), throughput (points per second where it
applies), error (the case's accuracy figure, named in `error_kind`), plus case-specific fields.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
SIGMAS = (0.002, 0.01, 0.1, 1.0, 10.0, 80.0)


# ----------------------------------------------------------------------------------------------------
# Helpers
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _in_subprocess(case: str, **kwargs) -> dict:
    """Run `case` in a fresh interpreter (clean peak-memory counter) and return its row."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
            f"from benchmarks.cases import scale; print(json.dumps(scale.{case}(**{kwargs!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class PlantedLowRank:
    """A re-iterable loader of n samples from mean + W diag(sqrt(lam)) z + sqrt(noise) e (lam_i = top * decay^i,
    i < r): every batch regenerated from its own seed, so no pass holds more than one batch."""

    def __init__(self, n, d, r, batch=256, top=100.0, decay=0.8, noise=0.05, seed=0):
        self.n, self.d, self.r, self.batch, self.noise, self.seed = n, d, r, batch, noise, seed
        g = torch.Generator().manual_seed(seed)
        self.W = torch.linalg.qr(torch.randn(d, r, generator=g)).Q
        self.lam = top * decay ** torch.arange(r, dtype=torch.float64)
        self.mean = 1.0 + torch.randn(d, generator=g)

    def __iter__(self):
        std = torch.sqrt(self.lam).float()
        for i, a in enumerate(range(0, self.n, self.batch)):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
            b = min(self.batch, self.n - a)
            z = torch.randn(b, self.r, generator=g) * std
            yield self.mean + z @ self.W.T + math.sqrt(self.noise) * torch.randn(b, self.d, generator=g)


def _sin_angle(U, V):
    """Sine of the largest principal angle between the spans of orthonormal U and V."""
    U, V = U.double(), V.double()
    return float(torch.linalg.matrix_norm(U - V @ (V.T @ U), ord=2))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------------------------------
# Cases (each returns one row; the memory cases run in a subprocess)
def lowrank_fit_case(n: int, d: int, r: int, seed: int = 0) -> dict:
    from gsa_kernels.gaussian.fit import fit_gaussian

    loader = PlantedLowRank(n, d, r, seed=seed)
    t0 = time.perf_counter()
    for _ in loader:     # one pass of the loader alone: the cost of producing the data
        pass
    t_loader = time.perf_counter() - t0
    before = _status_kib("VmHWM") * 1024
    t0 = time.perf_counter()
    res = fit_gaussian(loader, r, method="lowrank")
    t_fit = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024 - before
    rel_res = float((res.residuals[0] / res.eigvals[0]).max())
    return {"case": f"gaussian_fit_lowrank_d{d}", "n": n, "d": d, "rank": r, "time_s": t_fit,
            "loader_pass_s": t_loader, "passes": res.n_passes, "peak_mem_bytes": peak,
            "throughput": n * res.n_passes / t_fit, "throughput_unit": "samples*passes/s",
            "error": rel_res, "error_kind": "max ||C u - lam u|| / lam (bounds |lam error|/lam)",
            "sin_angle_to_planted": _sin_angle(res.basis[0], loader.W),
            "lam_perp": float(res.lam_perp[0]), "top_eigval": float(res.eigvals[0, 0]),
            "covariance_fp64_bytes_if_formed": 8 * d * d}


def lowrank_vs_eigh_case(d: int, r: int = 16, seed: int = 0) -> dict:
    import gsa_kernels

    n = int(1.5 * d)
    data = torch.cat(list(PlantedLowRank(n, d, r, seed=seed))).double()
    t0 = time.perf_counter()
    full = gsa_kernels.GaussianModel.fit(data, rank=r, method="full", dtype=torch.float64)
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    low = gsa_kernels.GaussianModel.fit(data, rank=r, method="lowrank", dtype=torch.float64)
    t_low = time.perf_counter() - t0
    x = data[:16] + torch.randn(16, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    den = {s: _rel(low.denoise(x, s), full.denoise(x, s)) for s in SIGMAS}
    eig_err = float(((low.eigvals - full.eigvals).abs() / full.eigvals).max())
    return {"case": f"gaussian_lowrank_vs_eigh_d{d}", "n": n, "d": d, "rank": r, "time_s": t_low,
            "time_full_s": t_full, "passes": low.fit_info_["n_passes"], "peak_mem_bytes": None,
            "throughput": None, "error": eig_err, "error_kind": "max relative eigenvalue error vs eigh",
            "sin_angle_vs_eigh": _sin_angle(low.basis, full.basis),
            "lam_perp_rel_err": abs(float(low.lam_perp - full.lam_perp)) / float(full.lam_perp),
            "denoise_rel_diff_by_sigma": den}


def write_points_file(path: str, n: int, d: int, dtype: str = "float32", seed: int = 0) -> None:
    from gsa_kernels.mixture.storage import write_npy

    g = torch.Generator().manual_seed(seed)
    chunks = (torch.randn(min(8192, n - a), d, generator=g) for a in range(0, n, 8192))
    write_npy(path, chunks, n, d, dtype=getattr(torch, dtype))


def streamed_delta_case(path: str, batch: int, source: str, dtype: str = "float32", cold: bool = False) -> dict:
    """Denoiser calls over the points of a .npy file: loaded into memory (DeltaMixture) or streamed from
    the file (StreamedDeltaMixture). peak_mem_bytes: VmHWM at the end minus VmRSS after imports."""
    import numpy as np

    import gsa_kernels
    from gsa_kernels.mixture.storage import StreamedDeltaMixture

    base = _status_kib("VmRSS") * 1024
    tdt = getattr(torch, dtype)
    if source == "memory":
        raw = torch.from_numpy(np.load(path))
        model = gsa_kernels.DeltaMixture(raw.view(torch.bfloat16) if tdt == torch.bfloat16 else raw)
    else:
        model = StreamedDeltaMixture(path, dtype=tdt if tdt == torch.bfloat16 else None)
    n, d = model.n_points, model.dim
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(1))
    model.denoise(x, 1.0)   # warm-up
    times = []
    for _ in range(3):
        if cold:   # evict the file from the page cache: every read comes from the disk
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        t0 = time.perf_counter()
        out = model.denoise(x, 1.0)
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM") * 1024 - base
    t = min(times)
    where = source + (" (cold cache)" if cold else " (page cache)" if source == "npy" else "")
    return {"case": f"delta_denoise_{source}{'_cold' if cold else ''}_{dtype}_n{n}", "where": where, "n": n,
            "d": d, "batch": batch, "dtype": dtype, "time_s": t, "peak_mem_bytes": peak, "throughput": n / t,
            "throughput_unit": "points/s (one call, batch queries)", "point_queries_per_s": n * batch / t,
            "bytes_per_point": d * tdt.itemsize, "file_bytes": n * d * tdt.itemsize,
            "out_norm": float(out.double().norm()), "error": None, "error_kind": ""}


def delta_accuracy_case(n: int, d: int, batch: int = 16) -> dict:
    """Float32 error of the in-memory and the streamed (several chunks) training-set denoiser vs float64."""
    import gsa_kernels
    from gsa_kernels.mixture.storage import StreamedDeltaMixture

    g = torch.Generator().manual_seed(0)
    pts = torch.randn(n, d, generator=g)
    worst = {"memory_vs_fp64": 0.0, "streamed_vs_fp64": 0.0, "streamed_vs_memory": 0.0}
    ref, mem = gsa_kernels.DeltaMixture(pts.double()), gsa_kernels.DeltaMixture(pts)
    st = StreamedDeltaMixture(pts, chunk_rows=max(1, n // 4))
    for s in SIGMAS:
        x = pts[:batch] + s * torch.randn(batch, d, generator=g)
        r, a, b = ref.denoise(x.double(), s), mem.denoise(x, s), st.denoise(x, s)
        for key, val in (("memory_vs_fp64", _rel(a, r)), ("streamed_vs_fp64", _rel(b, r)),
                         ("streamed_vs_memory", _rel(b, a))):
            worst[key] = max(worst[key], val)
    return {"case": f"delta_float32_accuracy_n{n}_d{d}", "n": n, "d": d, "time_s": None, "peak_mem_bytes": None,
            "throughput": None, **worst, "error": worst["streamed_vs_memory"],
            "error_kind": "max over sigma of rel diff streamed (4 chunks) vs in-memory, float32"}


def _heldout_loglik(weights, means, covs, X):
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(len(weights), covariance_type="full")
    gm.weights_, gm.means_, gm.covariances_ = weights, means, covs
    gm.precisions_cholesky_ = __import__("numpy").linalg.cholesky(__import__("numpy").linalg.inv(covs))
    return float(gm.score(X))


def em_refinement_case(dataset: str, k: int, reg: float, seed: int = 0) -> dict:
    """Held-out mean log-likelihood: GMM.fit (k-means + per-cluster moments, full rank) vs the same model
    refined by EM (scikit-learn's GaussianMixture started from it). Both get `reg` * I added."""
    import numpy as np
    from sklearn.mixture import GaussianMixture

    import gsa_kernels

    if dataset == "digits":
        from sklearn.datasets import load_digits
        X = load_digits().data.astype(np.float64)
    else:   # overlapping synthetic GMM
        rng = np.random.default_rng(seed)
        d = 16
        centres = rng.normal(scale=0.6, size=(k, d))   # overlapping clusters
        A = rng.normal(size=(k, d, d)) / math.sqrt(d)
        lab = rng.integers(k, size=6000)
        X = centres[lab] + np.einsum("nij,nj->ni", A[lab], rng.normal(size=(6000, d)))
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(len(X))
    cut = int(0.7 * len(X))
    train, test = X[perm[:cut]], X[perm[cut:]]
    d = X.shape[1]
    gmm = gsa_kernels.GMM.fit(torch.from_numpy(train), k, rank=d, seed=seed, dtype=torch.float64, verbose=False)
    w = torch.exp(gmm.log_weights).numpy()
    w = w / w.sum()
    mu = gmm.means.numpy()
    U, lam = gmm.bases.numpy(), gmm.eigvals.numpy()
    covs = np.einsum("kdr,kr,ker->kde", U, lam, U) + reg * np.eye(d)
    ll_kmeans = _heldout_loglik(w, mu, covs, test)
    em = GaussianMixture(len(w), covariance_type="full", reg_covar=reg, weights_init=w, means_init=mu,
                         precisions_init=np.linalg.inv(covs), max_iter=200, random_state=seed).fit(train)
    ll_em = float(em.score(test))
    return {"case": f"gmm_em_refinement_{dataset}", "n_train": len(train), "n_test": len(test), "d": d, "k": k,
            "reg": reg, "time_s": None, "peak_mem_bytes": None, "throughput": None,
            "heldout_ll_kmeans_moments": ll_kmeans, "heldout_ll_after_em": ll_em, "em_iters": int(em.n_iter_),
            "train_ll_kmeans_moments": _heldout_loglik(w, mu, covs, train), "train_ll_after_em": float(em.score(train)),
            "error": ll_em - ll_kmeans, "error_kind": "held-out nats/sample gained by EM"}


# ----------------------------------------------------------------------------------------------------
def run(quick: bool) -> list[dict]:
    rows = []
    if quick:
        rows.append(_in_subprocess("lowrank_fit_case", n=4000, d=8192, r=16))
        rows.append(lowrank_vs_eigh_case(1024))
        n, d = 65536, 512
    else:
        rows.append(_in_subprocess("lowrank_fit_case", n=20000, d=65536, r=16))
        rows.append(lowrank_vs_eigh_case(2048))
        n, d = 131072, 512
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            for m in (1, 4):
                write_points_file(os.path.join(tmp, f"{dtype}_{m}.npy"), m * n // 4, d, dtype)
        for source, dtype, cold, m in (("memory", "float32", False, 4), ("npy", "float32", False, 4),
                                       ("npy", "float32", True, 4), ("memory", "bfloat16", False, 4),
                                       ("npy", "bfloat16", False, 4), ("npy", "float32", False, 1),
                                       ("memory", "float32", False, 1)):
            rows.append(_in_subprocess("streamed_delta_case", path=os.path.join(tmp, f"{dtype}_{m}.npy"),
                                       batch=16, source=source, dtype=dtype, cold=cold))
    rows.append(delta_accuracy_case(16384, 64))
    rows.append(delta_accuracy_case(65536, 512))
    rows.append(em_refinement_case("synthetic", 8, 1e-6))
    rows.append(em_refinement_case("digits", 10, 1e-2))
    return rows


def _environment() -> dict:
    import gsa_kernels

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()}-core CPU"
    return {"date": datetime.date.today().isoformat(), "device": dev, "torch": torch.__version__,
            "gsa_kernels": gsa_kernels.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def _markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Scale benchmark ({env['date']})", "", f"Device: {env['device']}; torch {env['torch']}; "
             f"gsa_kernels {env['gsa_kernels']}; {env['threads']} threads.", "",
             "| case | n | d | time (s) | peak growth (MiB) | throughput | error | error kind |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pk = "" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        tp = "" if r.get("throughput") is None else f"{r['throughput']:.4g} {r.get('throughput_unit', '')}"
        tm = "" if r.get("time_s") is None else f"{r['time_s']:.3f}"
        lines.append(f"| {r['case']} | {r.get('n', r.get('n_train', ''))} | {r.get('d', '')} | {tm} | {pk} | {tp} | "
                     f"{'' if r.get('error') is None else format(r['error'], '.3g')} | {r['error_kind']} |")
    lines += ["", "Full rows (all fields) are in the JSON file next to this one."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (minutes on a 2-core CPU)")
    args = p.parse_args(argv)
    env = _environment()
    rows = run(args.quick)
    RESULTS_DIR.mkdir(exist_ok=True)
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    stem = RESULTS_DIR / f"scale_{kind}{'_quick' if args.quick else ''}_{env['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(_markdown(env, rows))
    print(_markdown(env, rows))


if __name__ == "__main__":
    main()
