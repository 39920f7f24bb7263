"""The mixture VJP (docs/math.md section 3.4) in PyTorch, chunked over components: the CUDA kernel of
gsa::gmm_vjp and gsa::delta_mixture_vjp until a Triton kernel exists.

Memory is flat in K: one chunk of C components at a time ([B, C, d] temporaries with B C d <= 2^24
elements), merged by the online log-sum-exp with float64 per-row state. The logits use the plain
(uncentred) difference x - mu_i of each chunk, so this path has the float32 accuracy of a direct
evaluation, not the chunk-frame construction of the CPU kernel.
"""
from __future__ import annotations

import torch

from .._core.dtypes import compute_dtype

_CHUNK_ELEMENTS = 1 << 24
_VAR_MIN = torch.finfo(torch.float32).tiny


def mixture_vjp(x, log_weights, means, bases, eigvals, lam_perp, sigma, frame, v):
    """J^T v of the mixture denoiser at x [B, ...] (bases None: r = 0; lam_perp None: 0)."""
    ct = compute_dtype(x, log_weights, means, bases, eigvals, lam_perp)
    B = x.shape[0]
    x2, f2, v2 = (t.reshape(B, -1).to(ct) for t in (x, frame, v))
    K, d = means.shape
    r = 0 if bases is None else bases.shape[2]
    s2 = (sigma.to(ct).reshape(-1) ** 2).expand(B).clamp(_VAR_MIN)[:, None]          # [B, 1]
    step = max(1, _CHUNK_ELEMENTS // max(B * d * (1 + r), 1))
    run_max = torch.full((B,), float("-inf"), dtype=torch.float64, device=x.device)
    run_sum = torch.zeros(B, dtype=torch.float64, device=x.device)
    acc = torch.zeros(3, B, d, dtype=ct, device=x.device)   # sum p beta (D_i - F), sum p (D_i - F), sum p A_i v
    for k0 in range(0, K, step):
        mu = means[k0:k0 + step].to(ct)
        xc = x2[:, None, :] - mu[None]                                                 # [B, C, d]
        q = (xc * xc).sum(-1)
        lp = (lam_perp[k0:k0 + step].to(ct) if lam_perp is not None else mu.new_zeros(mu.shape[0]))[None]
        vp = (lp + s2).clamp(_VAR_MIN)                                                  # [B, C]
        a = lp / vp if r < d else torch.zeros_like(vp)
        logit = -0.5 * (d - r) * torch.log(vp)                                          # log N_i + const
        dev = (1 - a)[..., None] * (mu[None] - f2[:, None]) + a[..., None] * (x2 - f2)[:, None]  # D_i - F
        av = a[..., None] * v2[:, None]                                                 # A_i v
        if r > 0:
            U = bases[k0:k0 + step].to(ct)
            lam = eigvals[k0:k0 + step].to(ct)[None]                                    # [1, C, r]
            c = torch.einsum("bkd,kdr->bkr", xc, U)
            vlam = (lam + s2[..., None]).clamp(_VAR_MIN)
            g = lam / vlam - a[..., None]
            logit = logit - 0.5 * ((c * c / vlam).sum(-1) + torch.log(vlam).sum(-1))
            if r < d:
                q = q - (c * c).sum(-1)
            dev = dev + torch.einsum("kdr,bkr->bkd", U, g * c)
            av = av + torch.einsum("kdr,bkr->bkd", U, g * torch.einsum("bd,kdr->bkr", v2, U))
        if r < d:
            logit = logit - 0.5 * q.clamp_min(0) / vp
        if log_weights is not None:
            logit = logit + log_weights[k0:k0 + step].to(ct)[None]
        logit = logit.double()
        m_new = torch.maximum(run_max, logit.max(1).values)
        shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(run_max - shift)
        p = torch.exp(logit - shift[:, None])
        run_max, run_sum = m_new, run_sum * alpha + p.sum(1)
        beta = (v2[:, None] * dev).sum(-1)                                              # v.(D_i - F)
        p, alpha = p.to(ct), alpha.to(ct)[:, None]
        acc[0] = acc[0] * alpha + ((p * beta)[..., None] * dev).sum(1)
        acc[1] = acc[1] * alpha + (p[..., None] * dev).sum(1)
        acc[2] = acc[2] * alpha + (p[..., None] * av).sum(1)
    e = acc / run_sum.to(ct).clamp_min(torch.finfo(ct).tiny)[None, :, None]
    out = e[2] + (e[0] - (v2 * e[1]).sum(-1, keepdim=True) * e[1]) / s2
    return out.reshape(x.shape).to(x.dtype)
