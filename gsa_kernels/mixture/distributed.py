"""Mixtures sharded across ranks (torch.distributed): points or components split over processes/GPUs.

Each rank evaluates its shard with the streaming op and keeps the per-row state of its log-sum-exp in
normalized form: (m_r, s_r, acc_r) = (log_z_r, 1, out_r), i.e. the running max is the shard's log-sum-exp,
the sum of exponentials relative to it is 1, and the weighted sum is the shard's denoiser (or score,
which is affine in it). The exact merge is

    M = max_r m_r,   e_r = exp(m_r - M),   out = sum_r e_r out_r / sum_r e_r,   log_z = M + log sum_r e_r

with one all_reduce(MAX) of [B] and one all_reduce(SUM) of [B, d + 1]; after the sum every rank holds one
state (M, sum_r e_r, sum_r e_r out_r), which the package's one exact merge (_core/lse.py) normalizes. It equals the single-process
answer up to float rounding (the shards only change the order of the sums). All ranks use one shared
centre (the global mean of the points/means) so that the score is formed in the same frame everywhere.
"""
from __future__ import annotations

import torch
from torch import nn

from .._core.collectives import all_max, all_sum
from .._core.lse import merge_states, safe_shift
from . import ops
from .model import GMM, DeltaMixture, Mixture
from .storage import StreamedDeltaMixture


def _global_shift(log_z: torch.Tensor, group) -> torch.Tensor:
    return safe_shift(all_max(log_z, group))


def merge_partials(out: torch.Tensor, log_z: torch.Tensor, group=None):
    """Exact all-rank merge of per-shard (out [B, ...], log_z [B]); every rank gets the merged pair."""
    B = log_z.shape[0]
    shift = _global_shift(log_z, group)
    e = torch.exp(log_z - shift)  # 0 on a shard with no weight
    packed = all_sum(torch.cat([(e[:, None] * out.reshape(B, -1).to(e.dtype)), e[:, None]], dim=1), group)
    merged = merge_states(shift[None], packed[None, :, -1], packed[None, :, :-1])
    return merged.out.to(out.dtype).reshape(out.shape), merged.log_w


class ShardedMixture(nn.Module):
    """A GMM or training set whose components are split over the ranks of `group`.

    local: this rank's shard (a GMM, a DeltaMixture, or a StreamedDeltaMixture read from disk; shards may
    differ in size). Collective: every rank
    must call the same methods with the same x and sigma. Log-weights are taken as given on every shard
    (not normalized per shard), so uniform weights mean uniform over the union.
    """

    def __init__(self, local: Mixture, group=None):
        super().__init__()
        if not isinstance(local, (GMM, DeltaMixture, StreamedDeltaMixture)):
            raise TypeError(f"local must be a GMM, DeltaMixture or StreamedDeltaMixture, got {type(local).__name__}")
        self.local = local
        self.group = group
        if isinstance(local, StreamedDeltaMixture):  # its centre is the mean of its rows, computed as it opened
            mean, n_rows = local.center.to(torch.float64), local.n_points
        else:
            rows = local.means if isinstance(local, GMM) else local.points
            mean, n_rows = ops.mean_of_rows(rows), rows.shape[0]
        # Shared centre = global mean of the rows; global log-weight normalizer.
        count = torch.tensor([float(n_rows)], dtype=torch.float64, device=mean.device)
        total = all_sum(torch.cat([mean * count, count]), group)
        self.register_buffer("center", (total[:-1] / total[-1]).to(local.center.dtype), persistent=False)
        lw = local.log_weights
        if lw is None:
            self._log_norm = float(torch.log(total[-1]))
        else:
            m = all_max(torch.max(lw).to(torch.float64).reshape(1), group)
            s = all_sum(torch.exp(lw.to(torch.float64) - m).sum().reshape(1), group)
            self._log_norm = float(m + torch.log(s))

    def forward(self, x, sigma, *, score=False) -> ops.MixtureOutput:
        out, log_z, _ = self.local.partial(x, sigma, score=score, center=self.center)
        out, log_z = merge_partials(out, log_z, self.group)
        return ops.MixtureOutput(out, log_z - self._log_norm, None)

    def denoise(self, x, sigma) -> torch.Tensor:
        return self.forward(x, sigma).out

    def score(self, x, sigma) -> torch.Tensor:
        return self.forward(x, sigma, score=True).out

    def log_prob(self, x, sigma) -> torch.Tensor:
        return self.forward(x, sigma).log_prob

    def posterior(self, x, sigma) -> torch.Tensor:
        """This rank's slice [B, K_local] of the global posterior weights (GMM shards only)."""
        if not isinstance(self.local, GMM):
            raise TypeError("posterior weights are available for GMM shards only")
        _, log_z, w = self.local.partial(x, sigma, return_weights=True, center=self.center)
        shift = _global_shift(log_z, self.group)
        total = all_sum(torch.exp(log_z - shift), self.group)
        return w * (torch.exp(log_z - shift) / total)[:, None]
