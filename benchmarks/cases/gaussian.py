"""Gaussian ops (docs/math.md section 2.1): teleport, denoise, score.

Backends: the package op (GaussianModel methods), the float32 eager reference
(gsa_kernels.gaussian.reference), torch.compile of it, the papers'-reference-code style (a dense d x d
covariance: a dense solve per call for denoise/score, a dense d x d operator built from the
eigendecomposition per call for teleport), and the two bare matmuls x @ U and c @ U^T.
"""
from __future__ import annotations

import math

import torch

from ..harness.environment import free_memory_bytes
from ..harness.memory import nbytes
from ..harness.run import Case, RunOptions, standard_backends

FAMILY = "gaussian"
OPS = ("teleport", "denoise", "score")

# (d, r) configurations and batch sizes per shape set. "full" is the GPU set: 32x32x3 full rank,
# 64x64x3 full rank and r = 1024, a 4x64x64 latent full rank, 256x256x3 with r = 1024.
SHAPES = {
    "full": {"configs": [(3072, 3072), (12288, 12288), (12288, 1024), (16384, 16384), (196608, 1024)],
             "batches": (1, 16, 256, 2048)},
    "quick": {"configs": [(768, 768), (3072, 3072), (3072, 256)], "batches": (1, 16, 256)},
    "tiny": {"configs": [(48, 48), (192, 16)], "batches": (1, 8)},
}


def available() -> str | None:
    return None  # the Gaussian ops are part of the package core


class GaussianParams:
    """A random Gaussian model (orthonormal basis, eigenvalues from 10 down to 1e-4) in float32 on the
    device, with float64 copies for the reference."""

    def __init__(self, d: int, r: int, device: torch.device, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.d, self.r = d, r
        self.mean = 0.5 + 0.1 * torch.randn(d, device=device, generator=gen)
        self.basis = torch.linalg.qr(torch.randn(d, r, device=device, generator=gen))[0].contiguous()
        self.eigvals = torch.logspace(1, -4, r, device=device)
        self.lam_perp = torch.tensor(0.0 if r == d else 1e-4, device=device)
        self.args = (self.mean, self.basis, self.eigvals, self.lam_perp)
        self.args64 = tuple(t.double() for t in self.args)
        self.gen = gen

    def param_bytes(self) -> int:
        return nbytes(*self.args)


class PapersStyleGaussian:
    """The Gaussian ops written the way the papers' reference code writes them: the model is kept as its
    dense d x d covariance Sigma, and every call works with a dense d x d matrix at one scalar sigma.

    denoise: mu + Sigma (Sigma + s^2 I)^-1 (x - mu), by a dense solve; score: -(Sigma + s^2 I)^-1 (x - mu);
    teleport: mu + M (x - mu) with M = U diag(f(lam)) U^T + f(lam_perp)(I - U U^T) formed densely.
    """

    def __init__(self, mean, basis, eigvals, lam_perp):
        d, r = basis.shape
        self.mean, self.basis, self.eigvals, self.lam_perp = mean, basis, eigvals, float(lam_perp)
        self.eye = torch.eye(d, device=mean.device)
        cov = (basis * eigvals) @ basis.T
        if r < d:
            cov += self.lam_perp * (self.eye - basis @ basis.T)
        self.cov = cov

    def _solve(self, x, sigma):
        xc = x.reshape(x.shape[0], -1) - self.mean
        return torch.linalg.solve(self.cov + sigma**2 * self.eye, xc.T)  # [d, B]

    def denoise(self, x, sigma: float):
        y = self._solve(x, sigma)
        return (self.mean + (self.cov @ y).T).reshape(x.shape)

    def score(self, x, sigma: float):
        return (-self._solve(x, sigma).T).reshape(x.shape)

    def teleport(self, x, sigma_from: float, sigma_to: float):
        d, r = self.basis.shape
        s0, s1 = sigma_from**2, sigma_to**2
        f_modes = torch.sqrt((self.eigvals + s1) / (self.eigvals + s0))
        f_perp = math.sqrt((self.lam_perp + s1) / (self.lam_perp + s0)) if r < d else 0.0
        op = (self.basis * (f_modes - f_perp)) @ self.basis.T + f_perp * self.eye
        xc = x.reshape(x.shape[0], -1) - self.mean
        return (self.mean + xc @ op).reshape(x.shape)


def _op_callables(op, params: GaussianParams, model, papers, sigmas, sigma_floats):
    """(gsa, eager, papers) callables of x for one op; sigmas are [B] tensors, sigma_floats numbers."""
    from gsa_kernels.gaussian import reference

    ref_fn = {"teleport": reference.teleport, "denoise": reference.gaussian_denoise,
              "score": reference.gaussian_score}[op]
    method = getattr(model, op)
    paper_method = getattr(papers, op) if papers is not None else None
    args = params.args
    return (
        lambda x: method(x, *sigmas),
        lambda x: ref_fn(x, *args, *sigmas),
        (lambda x: paper_method(x, *sigma_floats)) if paper_method else None,
        ref_fn,
    )


def cases(opts: RunOptions, ops=OPS):
    from gsa_kernels import GaussianModel

    device = opts.device
    shape = SHAPES[opts.shape_set]
    batches = opts.batches or shape["batches"]
    for d, r in shape["configs"]:
        params = GaussianParams(d, r, device, opts.seed)
        model = GaussianModel(*params.args)
        papers, papers_skip = None, None
        dense_bytes = 4 * d * d
        if opts.wants("papers"):
            free = free_memory_bytes(device)
            if 4 * dense_bytes > 0.8 * free:  # Sigma, I, Sigma + s^2 I and the solver's LU copy
                papers_skip = f"dense d x d matrices need ~{4 * dense_bytes / 2**30:.0f} GiB"
            else:
                papers = PapersStyleGaussian(*params.args)
        for op in (op for op in OPS if op in ops):
            for batch in batches:
                yield _case(op, params, model, papers, papers_skip, batch, opts)
        del params, model, papers
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _case(op, params: GaussianParams, model, papers, papers_skip, batch, opts: RunOptions) -> Case:
    device = opts.device
    d, r = params.d, params.r
    if op == "teleport":
        sigma_floats = (opts.sigma_from, opts.sigma)
        x_scale = opts.sigma_from
    else:
        sigma_floats = (opts.sigma,)
        x_scale = math.sqrt(1.0 + opts.sigma**2)
    sigmas = tuple(torch.full((batch,), s, device=device) for s in sigma_floats)
    gsa, eager, paper_fn, ref_fn = _op_callables(op, params, model, papers, sigmas, sigma_floats)
    basis = params.basis
    mean = params.mean

    def make_x():
        return mean + x_scale * torch.randn(batch, d, device=device, generator=params.gen)

    def reference64(x_rows):
        return ref_fn(x_rows.double(), *params.args64, *sigma_floats)

    in_bytes = 4 * batch * d + params.param_bytes() + nbytes(*sigmas)
    out_bytes = 4 * batch * d
    bd, br, dd = 4 * batch * d, 4 * batch * r, 4 * d * d
    temp = {
        "gsa": out_bytes + 2 * br,
        "eager": 4 * bd + 2 * br,
        "papers": 4 * dd + 4 * bd,
        "matmuls": bd + br,
    }
    backends = standard_backends(
        opts, gsa=gsa, eager=eager, papers=paper_fn,
        matmuls=lambda x: (x.reshape(x.shape[0], -1) @ basis) @ basis.T,
        temp_bytes=temp, papers_skip=papers_skip)
    return Case(
        family=FAMILY, op=op, config={"d": d, "r": r}, batch=batch,
        # Two GEMMs of 2 B d r FLOPs each, plus centring, the residual term and the mean (about 4 B d).
        flops=4.0 * batch * d * r + 4.0 * batch * d,
        min_bytes=in_bytes + out_bytes,
        in_bytes=in_bytes, out_bytes=out_bytes,
        make_x=make_x, reference64=reference64,
        err_rows=min(batch, 64), backends=backends,
    )
