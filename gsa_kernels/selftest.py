"""python -m gsa_kernels.selftest: every op on every backend present, against the float64 references.

Run it first after installing on a new machine (a GPU especially). Each op runs at small shapes on fresh
random inputs (never zeros) at every noise level from 0.002 to 80, in float32, float64, float16 and
bfloat16, on

  cpu          the C++ CPU kernels (always),
  cuda         the Triton kernels (when a CUDA device is present),
  interpreter  the CUDA kernel functions on CPU tensors under the Triton interpreter (--interpreter; it
               re-runs itself with TRITON_INTERPRET=1, which must be set before triton is imported).

New memory is filled with NaN while the ops run (torch's fill_uninitialized_memory), so an output element
a kernel forgets to write shows up as a failure. The error of a row is max over sigma of
||out - ref|| / ||ref||, with the reference evaluated in float64 on the inputs as the op saw them (after
rounding to the row's dtype). The exit status is 1 if any row fails, 0 otherwise.

    python -m gsa_kernels.selftest [--interpreter] [--backends cpu,cuda] [--dtypes float32,float64]
                                   [--seed N] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from .gaussian import model as gaussian_model
from ._core.dtypes import compute_dtype
from .gaussian import cuda as gcuda
from .gaussian import ops as gops
from .gaussian.map_kind import OP_MAP_KINDS
from .gaussian import reference as GR
from .mixture import model as mixture_model
from .mixture import cuda as mcuda
from .mixture import ops as mops
from .mixture import reference as MR

SIGMAS = (0.002, 0.01, 0.1, 1.0, 10.0, 80.0)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
BACKENDS = ("cpu", "cuda", "interpreter")

# Relative-error bounds per output kind and dtype of x. float32 is the package's accuracy contract
# (Gaussian ops 1e-5; mixtures 1e-4, whose logits amplify float32 rounding of distances by 1/sigma^2);
# float16/bfloat16 are storage formats: their bound is a few units of their rounding.
_TOL = {
    "gaussian": {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2},
    "mixture": {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2},
}
# Shapes: B and d off the kernels' tile sizes, so every mask is exercised.
_B, _D, _RANK = 5, 40, 6
_K, _MIX_D, _MIX_RANK, _N_POINTS = 4, 20, 3, 40


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    error: float        # max over sigma of ||out - ref|| / ||ref|| (nan: non-finite output or an error)
    tolerance: float
    verdict: str        # "ok", "FAIL" or "ERROR"
    worst_sigma: float | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Random problems, float64 (the reference's precision); each backend casts them to the row's dtype.
def _gaussian_problem(gen):
    basis, _ = torch.linalg.qr(torch.randn(_D, _RANK, generator=gen, dtype=torch.float64))
    eigvals = torch.exp(math.log(0.05) + math.log(80.0) * torch.rand(_RANK, generator=gen, dtype=torch.float64))
    mean = torch.randn(_D, generator=gen, dtype=torch.float64)
    return {"mean": mean, "basis": basis, "eigvals": eigvals, "lam_perp": torch.tensor(0.05, dtype=torch.float64)}


def _gaussian_x(gen, p, sigma):
    z = torch.randn(_B, _RANK, generator=gen, dtype=torch.float64)
    x0 = p["mean"] + (z * p["eigvals"].sqrt()) @ p["basis"].T
    x0 = x0 + p["lam_perp"].sqrt() * torch.randn(_B, _D, generator=gen, dtype=torch.float64)
    return (x0 + sigma * torch.randn(_B, _D, generator=gen, dtype=torch.float64)).reshape(_B, 5, _D // 5)


def _gmm_problem(gen):
    bases, _ = torch.linalg.qr(torch.randn(_K, _MIX_D, _MIX_RANK, generator=gen, dtype=torch.float64))
    return {"log_weights": torch.randn(_K, generator=gen, dtype=torch.float64),
            "means": 2.0 * torch.randn(_K, _MIX_D, generator=gen, dtype=torch.float64),
            "bases": bases,
            "eigvals": 0.05 + torch.rand(_K, _MIX_RANK, generator=gen, dtype=torch.float64),
            "lam_perp": 0.01 + 0.05 * torch.rand(_K, generator=gen, dtype=torch.float64)}


def _delta_problem(gen):
    # Points clustered (spread 0.05 around 1): the float32 kernels expand distances about the points' mean,
    # so a logit's error is about eps * ||x - mean||^2 / sigma^2 (docs/math.md section 3.1); at this
    # spread log_prob stays within the float32 bound down to sigma = 0.002.
    return {"points": 1.0 + 0.05 * torch.randn(_N_POINTS, _MIX_D, generator=gen, dtype=torch.float64),
            "log_weights": torch.randn(_N_POINTS, generator=gen, dtype=torch.float64)}


def _mixture_x(gen, centres, spread, sigma):
    """Noised samples x = c + spread * z + sigma * eps around random centres (GMM means: spread ~ the
    components' widths; training points: 0). Off-distribution points would make scores ~ 1/sigma^2,
    beyond float16's range at sigma = 0.002."""
    idx = torch.randint(centres.shape[0], (_B,), generator=gen)
    x0 = centres[idx] + spread * torch.randn(_B, _MIX_D, generator=gen, dtype=torch.float64)
    return x0 + sigma * torch.randn(_B, _MIX_D, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Backends: the same calls through the public API (cpu, cuda) or through the functions registered as
# the ops' CUDA kernels, on CPU tensors (interpreter). Ops are looked up at call time, so a patched op
# is what runs.
class _PublicAPI:
    def project(self, x, p):
        return gops.project(x, p["mean"], p["basis"])

    def gaussian_map(self, op, x, p, *sigmas):
        return getattr(gops, op)(x, p["mean"], p["basis"], p["eigvals"], p["lam_perp"], *sigmas)

    def gmm_forward(self, x, p, sigma, score):
        return mops.gmm_forward(x, p["log_weights"], p["means"], p["bases"], p["eigvals"], p["lam_perp"], sigma,
                                score=score, return_weights=True)

    def delta_mixture_forward(self, x, p, sigma, score):
        return mops.delta_mixture_forward(x, p["points"], p["log_weights"], sigma, score=score)


class _KernelAPI(_PublicAPI):
    """The CUDA kernel functions called directly (the dispatcher sends CPU tensors to the C++ kernels)."""

    @staticmethod
    def _sigma(sigma, x, p0):
        return torch.full((x.shape[0],), sigma, dtype=compute_dtype(x, p0), device=x.device)

    def project(self, x, p):
        return gcuda.project_cuda(x, p["mean"], p["basis"])

    def gaussian_map(self, op, x, p, *sigmas):
        sig = [self._sigma(s, x, p["mean"]) for s in sigmas]
        return gcuda.map_cuda(OP_MAP_KINDS[op])(x, p["mean"], p["basis"], p["eigvals"], p["lam_perp"], *sig)

    def gmm_forward(self, x, p, sigma, score):
        out, log_z, w = mcuda.gmm_forward_cuda(x, p["log_weights"], p["means"], p["bases"], p["eigvals"], p["lam_perp"],
                                                self._sigma(sigma, x, p["means"]), score=score,
                                                return_weights=True)
        return mops.MixtureOutput(out, log_z - mops.log_weight_norm(p["log_weights"], p["means"].shape[0]), w)

    def delta_mixture_forward(self, x, p, sigma, score):
        out, log_z = mcuda.delta_mixture_forward_cuda(x, p["points"], p["log_weights"], self._sigma(sigma, x, p["points"]),
                                                        score=score)
        return mops.MixtureOutput(out, log_z - mops.log_weight_norm(p["log_weights"], p["points"].shape[0]),
                                  None)


# ---------------------------------------------------------------------------------------------
# The checks: (name, tolerance kind, problem, x maker, sigma pairs, run(api, x, params, s) -> outputs, ref).
def _gaussian_outputs(api, x, p, s):
    return {"project": api.project(x, p),
            "gaussian_denoise": api.gaussian_map("gaussian_denoise", x, p, s),
            "gaussian_score": api.gaussian_map("gaussian_score", x, p, s),
            "teleport": api.gaussian_map("teleport", x, p, s, s / 10),
            "teleport to 0": api.gaussian_map("teleport", x, p, s, 0.0)}


def _gaussian_refs(x, p, s):
    args = (x, p["mean"], p["basis"], p["eigvals"], p["lam_perp"])
    return {"project": GR.project(x, p["mean"], p["basis"]),
            "gaussian_denoise": GR.gaussian_denoise(*args, s),
            "gaussian_score": GR.gaussian_score(*args, s),
            "teleport": GR.teleport(*args, s, s / 10),
            "teleport to 0": GR.teleport(*args, s, 0.0)}


def _gmm_outputs(api, x, p, s):
    fwd = api.gmm_forward(x, p, s, score=False)
    return {"gmm_forward denoise": fwd.out, "gmm_forward log_prob": fwd.log_prob,
            "gmm_forward weights": fwd.weights, "gmm_forward score": api.gmm_forward(x, p, s, score=True).out}


def _gmm_refs(x, p, s):
    args = (x, p["log_weights"], p["means"], p["bases"], p["eigvals"], p["lam_perp"], s)
    return {"gmm_forward denoise": MR.gmm_denoise(*args), "gmm_forward log_prob": MR.gmm_log_prob(*args),
            "gmm_forward weights": MR.gmm_posterior(*args)[0], "gmm_forward score": MR.gmm_score(*args)}


def _delta_outputs(api, x, p, s):
    fwd = api.delta_mixture_forward(x, p, s, score=False)
    return {"delta_mixture_forward denoise": fwd.out, "delta_mixture_forward log_prob": fwd.log_prob,
            "delta_mixture_forward score": api.delta_mixture_forward(x, p, s, score=True).out}


def _delta_refs(x, p, s):
    args = (x, p["points"], p["log_weights"], s)
    return {"delta_mixture_forward denoise": MR.delta_mixture_denoise(*args),
            "delta_mixture_forward log_prob": MR.delta_mixture_log_prob(*args),
            "delta_mixture_forward score": MR.delta_mixture_score(*args)}


# The model classes' main calls (public backends only): parameters stored at construction, checked once.
def _model_outputs(models, x_gauss, x_gmm, x_delta, s):
    g, gmm, delta = models
    return {"GaussianModel.denoise": g.denoise(x_gauss, s), "GaussianModel.teleport": g.teleport(x_gauss, s, s / 10),
            "GMM.forward denoise": gmm(x_gmm, s).out, "DeltaMixture.forward denoise": delta(x_delta, s).out}


def _model_refs(gp, mp, dp, x_gauss, x_gmm, x_delta, s):
    r = _gaussian_refs(x_gauss, gp, s)
    return {"GaussianModel.denoise": r["gaussian_denoise"], "GaussianModel.teleport": r["teleport"],
            "GMM.forward denoise": _gmm_refs(x_gmm, mp, s)["gmm_forward denoise"],
            "DeltaMixture.forward denoise": _delta_refs(x_delta, dp, s)["delta_mixture_forward denoise"]}


def _kind(name: str) -> str:
    return "gaussian" if name.split(" ")[0] in ("project", "gaussian_denoise", "gaussian_score", "teleport") or \
        name.startswith("GaussianModel") else "mixture"


def _param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(p: dict, dtype, device) -> dict:
    return {k: v.to(device=device, dtype=dtype) for k, v in p.items()}


def _as_seen(p: dict, dtype) -> dict:
    """The float64 values of the parameters after the cast the op saw."""
    return {k: v.to(dtype).double() for k, v in p.items()}


def _rel_err(out, ref) -> float:
    out = out.detach().to("cpu", torch.float64)
    return float((out - ref).norm() / ref.norm())


@contextlib.contextmanager
def _poisoned_allocations():
    """torch.empty & co. return NaN-filled memory while the ops run."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def run_backend(backend: str, dtypes, seed: int) -> list[Row]:
    """All checks of one backend: one Row per (output, dtype)."""
    device = "cuda" if backend == "cuda" else "cpu"
    api = _KernelAPI() if backend == "interpreter" else _PublicAPI()
    rows = []
    for dtype in dtypes:
        pdt = _param_dtype(dtype)
        gen = torch.Generator().manual_seed(seed)
        gp, mp, dp = _gaussian_problem(gen), _gmm_problem(gen), _delta_problem(gen)
        gp_seen, mp_seen, dp_seen = _as_seen(gp, pdt), _as_seen(mp, pdt), _as_seen(dp, pdt)
        worst: dict[str, tuple[float, float | None, str]] = {}

        def record(name, err, s, note=""):
            """Keep the worst error over sigma; a nan (non-finite output, exception) stays."""
            prev = worst.get(name)
            if prev is None or (not math.isnan(prev[0]) and not err <= prev[0]):
                worst[name] = (err, s, note)

        models = None
        if backend != "interpreter":
            try:
                models = (gaussian_model.GaussianModel(**_cast(gp, pdt, device)),
                          mixture_model.GMM(**_cast(mp, pdt, device)),
                          mixture_model.DeltaMixture(**_cast(dp, pdt, device)))
            except Exception as exc:  # a model that cannot be built fails its rows
                models = exc
        for s in SIGMAS:
            xs = {"gauss": _gaussian_x(gen, gp, s), "gmm": _mixture_x(gen, mp["means"], 0.3, s),
                  "delta": _mixture_x(gen, dp["points"], 0.0, s)}
            xd = {k: v.to(device=device, dtype=dtype) for k, v in xs.items()}
            xo = {k: v.to(dtype).double() for k, v in xs.items()}
            groups = [
                (lambda: _gaussian_outputs(api, xd["gauss"], _cast(gp, pdt, device), s),
                 _gaussian_refs(xo["gauss"], gp_seen, s)),
                (lambda: _gmm_outputs(api, xd["gmm"], _cast(mp, pdt, device), s), _gmm_refs(xo["gmm"], mp_seen, s)),
                (lambda: _delta_outputs(api, xd["delta"], _cast(dp, pdt, device), s),
                 _delta_refs(xo["delta"], dp_seen, s)),
            ]
            if models is not None:
                groups.append((lambda: _model_outputs(models, xd["gauss"], xd["gmm"], xd["delta"], s),
                               _model_refs(gp_seen, mp_seen, dp_seen, xo["gauss"], xo["gmm"], xo["delta"], s)))
            for run, refs in groups:
                try:
                    if isinstance(models, Exception) and run is groups[-1][0]:
                        raise models
                    with _poisoned_allocations():
                        outs = run()
                except Exception as exc:
                    for name in refs:
                        record(name, math.nan, s, f"{type(exc).__name__}: {exc}"[:200])
                    continue
                for name, ref in refs.items():
                    out = outs[name]
                    if out is None or tuple(out.shape) != tuple(ref.shape):
                        got = None if out is None else tuple(out.shape)
                        record(name, math.nan, s, f"shape {got}, expected {tuple(ref.shape)}")
                    elif not bool(torch.isfinite(out).all()):
                        record(name, math.nan, s, "non-finite output")
                    else:
                        record(name, _rel_err(out, ref), s)
        for name, (err, s, note) in worst.items():
            tol = _TOL[_kind(name)][dtype]
            verdict = "ok" if err <= tol else ("FAIL" if not note or note == "non-finite output" else "ERROR")
            rows.append(Row(name, backend, str(dtype).replace("torch.", ""), err, tol, verdict, s, note))
    return rows


# ---------------------------------------------------------------------------------------------
def format_table(rows: list[Row]) -> str:
    head = f"{'op':32s} {'backend':11s} {'dtype':8s} {'max rel err':>11s} {'tolerance':>9s} {'worst sigma':>11s}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        err = "nan" if math.isnan(r.error) else f"{r.error:.2e}"
        ws = "" if r.worst_sigma is None else f"{r.worst_sigma:g}"
        lines.append(f"{r.op:32s} {r.backend:11s} {r.dtype:8s} {err:>11s} {r.tolerance:9.0e} {ws:>11s}  {r.verdict}"
                     + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def _environment() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    env = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
           "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    return env


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m gsa_kernels.selftest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interpreter", action="store_true",
                   help="also run the CUDA kernel functions on CPU under the Triton interpreter")
    p.add_argument("--backends", default=None,
                   help=f"comma list of {', '.join(BACKENDS)} (default: cpu, cuda when present, interpreter "
                        "with --interpreter)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of x dtypes")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh, printed)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        bad = [b for b in backends if b not in BACKENDS]
        if bad:
            raise SystemExit(f"--backends: unknown {bad} (choose from {BACKENDS})")
    else:
        backends = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
            (["interpreter"] if args.interpreter else [])
    if "interpreter" in backends and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter is chosen when the @triton.jit functions are created (at import): run again.
        env = dict(os.environ, TRITON_INTERPRET="1")
        print("selftest: re-running with TRITON_INTERPRET=1 for the interpreter backend", flush=True)
        return subprocess.call([sys.executable, "-m", "gsa_kernels.selftest", *argv], env=env)
    dtypes = []
    for name in (t.strip() for t in args.dtypes.split(",") if t.strip()):
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: unknown {name!r} (choose from {', '.join(DTYPES)})")
        dtypes.append(DTYPES[name])
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF

    t0 = time.perf_counter()
    rows, skipped = [], []
    for b in backends:
        if b == "cuda" and not torch.cuda.is_available():
            skipped.append("cuda (no CUDA device)")
            continue
        if b == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
            skipped.append("cuda (TRITON_INTERPRET=1 is set: run without it for the compiled kernels)")
            continue
        rows += run_backend(b, dtypes, seed)
    elapsed = time.perf_counter() - t0
    failed = [r for r in rows if r.verdict != "ok"]
    env = _environment()
    print(f"gsa_kernels selftest: torch {env['torch']}, triton {env['triton']}"
          + (f", {env['device']}" if "device" in env else ", no CUDA device") + f", seed {seed}")
    print(format_table(rows))
    for s in skipped:
        print(f"skipped backend: {s}")
    print(f"{len(rows) - len(failed)}/{len(rows)} ok in {elapsed:.1f} s"
          + (f"; {len(failed)} FAILED (rerun with --seed {seed})" if failed else ""))
    if args.json:
        payload = {"env": env, "seed": seed, "elapsed_s": elapsed, "skipped": skipped,
                   "passed": not failed, "rows": [asdict(r) for r in rows]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
