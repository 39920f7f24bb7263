"""Mixture ops (docs/math.md section 3): the GMM denoiser and the training-set (delta mixture) denoiser.

Backends: the package op (gsa_kernels.GMM(...).denoise, gsa_kernels.DeltaMixture(points).denoise), the
float32 eager reference (gsa_kernels.mixture.reference, which materializes [B, K, d]), torch.compile of
it, the papers'-reference-code style (dense einsums over a materialized [B, K, d] residual for GMMs;
torch.cdist + softmax + matmul for the training set), and the bare matmuls the op needs.

The float64 reference for the error column runs the package reference on chunks of components and merges
the chunks exactly (a log-sum-exp over the chunks' normalizers), so it fits in memory at any N.
"""
from __future__ import annotations

import math

import torch

from .common import Case, RunOptions, nbytes, standard_backends

FAMILY = "mixture"
OPS = ("gmm", "delta")

SHAPES = {
    "full": {"gmm": {"d": 3072, "K": (10, 100, 1000), "r": (0, 64, 256), "batches": (256,)},
             "delta": {"configs": [(50000, 3072), (200000, 12288)], "batches": (1, 64, 256)}},
    "quick": {"gmm": {"d": 768, "K": (10, 100), "r": (0, 32), "batches": (16, 128)},
              "delta": {"configs": [(2000, 768)], "batches": (1, 64, 256)}},
    "tiny": {"gmm": {"d": 48, "K": (4,), "r": (0, 4), "batches": (4,)},
             "delta": {"configs": [(64, 48)], "batches": (1, 4)}},
}

def _ref_chunk_bytes(device: torch.device) -> int:
    """Float64 reference chunks: each [rows, chunk, d] float64 temporary stays under this many bytes."""
    return (1 << 30) if device.type == "cuda" else (1 << 27)


def available() -> str | None:
    try:
        from gsa_kernels.mixture import reference  # noqa: F401
    except ImportError as exc:
        return f"gsa_kernels.mixture.reference is not importable ({exc})"
    return None


def _package_class(name: str):
    """gsa_kernels.GMM / gsa_kernels.DeltaMixture, or (None, why) while the mixture ops are not there."""
    try:
        import gsa_kernels

        cls = getattr(gsa_kernels, name, None)
        if cls is None:
            from gsa_kernels import mixture

            cls = getattr(mixture, name, None)
    except ImportError as exc:
        return None, f"gsa_kernels.{name} is not importable ({exc})"
    if cls is None:
        return None, f"gsa_kernels.{name} does not exist yet"
    return cls, None


def _package_op(name: str, *args):
    """The package's mixture object, or (None, why it is unavailable)."""
    cls, why = _package_class(name)
    if cls is None:
        return None, why
    try:
        return cls(*args), None
    except Exception as exc:  # an API still in flux must not stop the baselines
        return None, f"gsa_kernels.{name}(...) failed: {type(exc).__name__}: {exc}"[:200]


def merged_reference(denoise_chunk, log_z_chunk, n_components: int, chunk: int) -> torch.Tensor:
    """D = sum_c softmax_c(log Z_c) D_c over component chunks c, where D_c and log Z_c are the chunk's own
    denoiser and log-normalizer: exactly the full mixture's denoiser (a running log-sum-exp merge)."""
    acc, lse = None, None
    for start in range(0, n_components, chunk):
        part = slice(start, min(start + chunk, n_components))
        d_c, lz_c = denoise_chunk(part), log_z_chunk(part)
        if acc is None:
            acc, lse = d_c, lz_c
            continue
        new = torch.logaddexp(lse, lz_c)
        acc = acc * torch.exp(lse - new)[:, None] + d_c * torch.exp(lz_c - new)[:, None]
        lse = new
    return acc


# ------------------------------------------------------------------------------------------------------
# Papers'-reference-code style
def papers_gmm_denoise(x, log_weights, means, bases, eigvals, lam_perp, sigma: float):
    """Score-based GMM code in the papers' style: the residuals x - mu_i are materialized as [B, K, d],
    rotated into each component's eigenbasis with einsum, per-component scores are combined with the
    posterior weights, and D = x + sigma^2 score."""
    x2 = x.reshape(x.shape[0], -1)
    d = x2.shape[1]
    s2 = sigma**2
    res = x2[:, None, :] - means[None]                                   # [B, K, d]
    var_perp = lam_perp + s2                                             # [K]
    if bases is None:
        log_p = -0.5 * ((res**2).sum(-1) / var_perp + d * torch.log(var_perp))
        comp_score = -res / var_perp[None, :, None]
    else:
        r = bases.shape[2]
        var = eigvals + s2                                               # [K, r]
        rot = torch.einsum("bkd,kdr->bkr", res, bases)                   # [B, K, r]
        res_perp = res - torch.einsum("bkr,kdr->bkd", rot, bases)        # [B, K, d]
        log_p = -0.5 * ((rot**2 / var).sum(-1) + (res_perp**2).sum(-1) / var_perp
                        + torch.log(var).sum(-1) + (d - r) * torch.log(var_perp))
        comp_score = -torch.einsum("bkr,kdr->bkd", rot / var, bases) - res_perp / var_perp[None, :, None]
    w = torch.softmax(log_p + log_weights, dim=1)                        # [B, K]
    score = torch.einsum("bk,bkd->bd", w, comp_score)
    return (x2 + s2 * score).reshape(x.shape)


def papers_delta_denoise(x, points, sigma: float):
    """Training-set denoiser in the papers' style: torch.cdist, softmax, matmul."""
    x2 = x.reshape(x.shape[0], -1)
    dist2 = torch.cdist(x2, points) ** 2
    w = torch.softmax(-dist2 / (2 * sigma**2), dim=1)
    return (w @ points).reshape(x.shape)


# ------------------------------------------------------------------------------------------------------
def _spread(d: int) -> float:
    """Per-coordinate spread of the component means / training points: 2 / sqrt(d) keeps squared distances
    between them near 8 at every d, so at sigma ~ 1 the posterior weights are soft (a one-hot posterior
    would make every backend exact and the error column uninformative). With the mean offset 0.5, ||x||^2
    is far above the distances: the cancellation-prone regime of docs/math.md section 3.1."""
    return 2.0 / math.sqrt(d)


def cases(opts: RunOptions, ops=OPS):
    if "gmm" in ops:
        yield from _gmm_cases(opts)
    if "delta" in ops:
        yield from _delta_cases(opts)


def _gmm_cases(opts: RunOptions):
    device = opts.device
    spec = SHAPES[opts.shape_set]["gmm"]
    d = spec["d"]
    batches = opts.batches or spec["batches"]
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    for r in spec["r"]:
        for K in spec["K"]:
            log_weights = torch.log_softmax(torch.randn(K, device=device, generator=gen), 0)
            means = 0.5 + _spread(d) * torch.randn(K, d, device=device, generator=gen)
            if r:
                bases = torch.linalg.qr(torch.randn(K, d, r, device=device, generator=gen))[0].contiguous()
                eigvals = 0.01 + 2.0 * torch.rand(K, r, device=device, generator=gen)
                lam_perp = 0.01 + 0.04 * torch.rand(K, device=device, generator=gen)
            else:
                bases = eigvals = None
                lam_perp = 0.1 + 0.4 * torch.rand(K, device=device, generator=gen)
            params = (log_weights, means, bases, eigvals, lam_perp)
            model, gsa_skip = _package_op("GMM", *params) if opts.wants("gsa") else (None, None)
            # The bare matmuls: x @ [mu_i] and x @ [U_i] (all components side by side), then back.
            stacked = None
            if opts.wants("matmuls") and r:
                stacked = bases.permute(1, 0, 2).reshape(d, K * r).contiguous()
            for batch in batches:
                yield _gmm_case(opts, params, model, gsa_skip, stacked, batch, gen)
            del params, model, stacked, bases, means
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _gmm_case(opts, params, model, gsa_skip, stacked, batch, gen) -> Case:
    from gsa_kernels.mixture import reference

    device = opts.device
    log_weights, means, bases, eigvals, lam_perp = params
    K, d = means.shape
    r = 0 if bases is None else bases.shape[2]
    sigma = opts.sigma
    sigma_t = torch.full((batch,), sigma, device=device)
    x_scale = math.sqrt(0.5 + sigma**2)

    def make_x():
        idx = torch.randint(0, K, (batch,), device=device, generator=gen)
        return means[idx] + x_scale * torch.randn(batch, d, device=device, generator=gen)

    def reference64(x_rows):
        x64 = x_rows.double()
        rows = x64.shape[0]
        chunk = max(1, _ref_chunk_bytes(device) // (8 * rows * d * 4))

        def part(t, sl):
            return None if t is None else t[sl].double()

        def denoise_chunk(sl):
            return reference.gmm_denoise(x64, *(part(t, sl) for t in params), sigma)

        def log_z_chunk(sl):
            return reference.gmm_posterior(x64, *(part(t, sl) for t in params), sigma)[1]

        return merged_reference(denoise_chunk, log_z_chunk, K, chunk)

    def matmuls(x):
        x2 = x.reshape(x.shape[0], -1)
        out = (x2 @ means.T) @ means
        if stacked is not None:
            out = out + (x2 @ stacked) @ stacked.T
        return out

    in_bytes = 4 * batch * d + nbytes(*params, sigma_t)
    out_bytes = 4 * batch * d
    bkd, bkr = 4 * batch * K * d, 4 * batch * K * r
    temp = {"gsa": 2 * out_bytes + 16 * batch * K,
            "eager": 5 * bkd + 4 * bkr, "papers": 5 * bkd + 3 * bkr, "matmuls": 2 * bkr + 8 * batch * K}
    backends = standard_backends(
        opts,
        gsa=(lambda x: model.denoise(x, sigma_t)) if model is not None else None,
        eager=lambda x: reference.gmm_denoise(x, *params, sigma_t),
        papers=lambda x: papers_gmm_denoise(x, *params, sigma),
        matmuls=matmuls, temp_bytes=temp, gsa_skip=gsa_skip)
    return Case(
        family=FAMILY, op="gmm", config={"d": d, "K": K, "r": r}, batch=batch,
        # GEMM work: x . mu_i and sum_i w_i mu_i (2 B K d each), projections and reconstructions (2 B K d r each).
        flops=4.0 * batch * K * d * (r + 1),
        min_bytes=in_bytes + out_bytes, in_bytes=in_bytes, out_bytes=out_bytes,
        make_x=make_x, reference64=reference64, err_rows=min(batch, 8), backends=backends)


def _delta_cases(opts: RunOptions):
    device = opts.device
    spec = SHAPES[opts.shape_set]["delta"]
    batches = opts.batches or spec["batches"]
    gen = torch.Generator(device=device).manual_seed(opts.seed + 1)
    for n_points, d in spec["configs"]:
        points = 0.5 + _spread(d) * torch.randn(n_points, d, device=device, generator=gen)
        model, gsa_skip = _package_op("DeltaMixture", points) if opts.wants("gsa") else (None, None)
        for batch in batches:
            yield _delta_case(opts, points, model, gsa_skip, batch, gen)
        del points, model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _delta_case(opts, points, model, gsa_skip, batch, gen) -> Case:
    from gsa_kernels.mixture import reference

    device = opts.device
    n_points, d = points.shape
    sigma = opts.sigma
    sigma_t = torch.full((batch,), sigma, device=device)

    def make_x():
        idx = torch.randint(0, n_points, (batch,), device=device, generator=gen)
        return points[idx] + sigma * torch.randn(batch, d, device=device, generator=gen)

    def reference64(x_rows):
        x64 = x_rows.double()
        chunk = max(1, _ref_chunk_bytes(device) // (8 * x64.shape[0] * d))

        def denoise_chunk(sl):
            return reference.delta_mixture_denoise(x64, points[sl].double(), None, sigma)

        def log_z_chunk(sl):
            return reference.delta_mixture_posterior(x64, points[sl].double(), None, sigma)[1]

        return merged_reference(denoise_chunk, log_z_chunk, n_points, chunk)

    in_bytes = 4 * batch * d + nbytes(points, sigma_t)
    out_bytes = 4 * batch * d
    bnd, bn = 4 * batch * n_points * d, 4 * batch * n_points
    temp = {"gsa": 2 * out_bytes + 2 * bn, "eager": 2 * bnd + 3 * bn, "papers": 4 * bn, "matmuls": bn}
    backends = standard_backends(
        opts,
        gsa=(lambda x: model.denoise(x, sigma_t)) if model is not None else None,
        eager=lambda x: reference.delta_mixture_denoise(x, points, None, sigma_t),
        papers=lambda x: papers_delta_denoise(x, points, sigma),
        matmuls=lambda x: (x.reshape(x.shape[0], -1) @ points.T) @ points,
        temp_bytes=temp, gsa_skip=gsa_skip)
    return Case(
        family=FAMILY, op="delta", config={"N": n_points, "d": d}, batch=batch,
        flops=4.0 * batch * n_points * d,  # distances x . x_i and sum_i w_i x_i
        min_bytes=in_bytes + out_bytes, in_bytes=in_bytes, out_bytes=out_bytes,
        make_x=make_x, reference64=reference64, err_rows=min(batch, 8), backends=backends)
