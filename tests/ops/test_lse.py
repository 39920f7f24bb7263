"""The one exact log-sum-exp merge (gsa_kernels._core.lse) against a direct float64 log-sum-exp."""
import torch

from gsa_kernels.mixture import merge_normalized, merge_states
from helpers import rel_err


def test_merge_states_equals_direct_logsumexp():
    g = torch.Generator().manual_seed(0)
    logits = 30 * torch.randn(12, 3, generator=g, dtype=torch.float64)      # 12 components, 3 rows
    values = torch.randn(12, 3, 5, generator=g, dtype=torch.float64)
    logits[4:8, 1] = float("-inf")                                          # an empty state in row 1
    w = torch.softmax(logits, dim=0)
    want = (w.unsqueeze(-1) * values).sum(0)
    parts = [slice(0, 4), slice(4, 8), slice(8, 12)]
    m = torch.stack([logits[p].max(0).values for p in parts])                # -inf for the empty state
    e = [torch.exp(logits[p] - torch.nan_to_num(m[i], neginf=0.0)) for i, p in enumerate(parts)]
    l = torch.stack([ei.sum(0) for ei in e])
    acc = torch.stack([(ei.unsqueeze(-1) * values[p]).sum(0) for ei, p in zip(e, parts)])
    merged = merge_states(m, l, acc)
    assert rel_err(merged.out, want) < 1e-13
    assert rel_err(merged.log_w, torch.logsumexp(logits, 0)) < 1e-13
    # Normalized partials (out_s, log_z_s) merge to the same answer.
    outs = torch.nan_to_num(acc / l.unsqueeze(-1))                         # the empty state: 0, log_z = -inf
    out, log_z = merge_normalized(outs, m + torch.log(l))
    assert rel_err(out, want) < 1e-13 and rel_err(log_z, torch.logsumexp(logits, 0)) < 1e-13


def test_merge_of_rows_without_weight_is_zero_not_nan():
    m = torch.full((2, 3), float("-inf"), dtype=torch.float64)
    merged = merge_states(m, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64))
    assert torch.equal(merged.out, torch.zeros(3, 4, dtype=torch.float64))
    assert torch.isneginf(merged.log_w).all() and torch.equal(merged.inv_w, torch.zeros(3, dtype=torch.float64))
