"""The one exact log-sum-exp merge (gsa_kernels._core.lse) against a direct float64 log-sum-exp, and its
Triton kernel (under TRITON_INTERPRET=1 on CPU tensors) against its PyTorch path."""
import pytest
import torch

from gsa_kernels._core.lse import merge_mixture
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


def _states(S, B, d, dtype, seed):
    """S random partial states of B rows (logits spread over ~60 nats), with empty states (m = -inf) in row 1
    and no weight at all in row 2."""
    g = torch.Generator().manual_seed(seed)
    m = 20 * torch.randn(S, B, generator=g, dtype=torch.float64)
    l = torch.rand(S, B, generator=g, dtype=torch.float64) + 0.5
    acc = torch.randn(S, B, d, generator=g, dtype=torch.float64)
    a = torch.randn(S, B, generator=g, dtype=torch.float64)
    m[::2, 1] = float("-inf")
    m[:, 2] = float("-inf")
    for t in (l, acc, a):
        t[m == float("-inf")] = 0.0
    return [t.to(dtype) for t in (m, l, acc, a)]


# The interpreter evaluates log(0) of the rows without weight in numpy, which warns.
interpreted = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("S", range(1, 9))
def test_merge_kernel_equals_the_pytorch_merge(S, dtype, tol):
    """The Triton merge (interpreted on CPU) against merge_states' PyTorch path: with and without the x term,
    a row with empty states and a row with no weight (out = 0, log W = -inf, no NaN)."""
    B, d = 4, 37
    m, l, acc, a = _states(S, B, d, dtype, seed=S)
    xr = torch.randn(B, d, generator=torch.Generator().manual_seed(9), dtype=dtype)
    for x_coef, x in ((None, None), (a, xr)):
        ref = merge_states(m, l, acc, x_coef, x, kernel=False)
        got = merge_states(m, l, acc, x_coef, x, kernel=True)
        for name in ("out", "log_w", "shift", "inv_w"):
            r, k = getattr(ref, name), getattr(got, name)
            assert k.dtype == dtype and not torch.isnan(k).any(), name
            finite = torch.isfinite(r)
            assert torch.equal(finite, torch.isfinite(k)) and torch.equal(r[~finite], k[~finite]), name
            assert rel_err(k[finite], r[finite]) < tol, name
        assert torch.equal(got.out[2], torch.zeros(d, dtype=dtype)) and torch.isneginf(got.log_w[2])


@interpreted
@pytest.mark.parametrize("dtype,tol,max_dtype", [(torch.float32, 2e-6, None), (torch.float64, 1e-13, None),
                                                 (torch.float32, 2e-6, torch.float64)])
@pytest.mark.parametrize("add_ctr,divide_by_s2,stats", [(True, False, True), (False, True, False),
                                                        (False, False, False)])
def test_merge_kernel_epilogue_equals_the_pytorch_epilogue(dtype, tol, max_dtype, add_ctr, divide_by_s2, stats):
    """merge_mixture's one launch (x - ctr formed in the kernel, centre, 1 / sigma^2, Gaussian normaliser)
    against its PyTorch path, with sigma from 0.002 to 80; a row without weight gets ctr (or 0). float64 maxima
    over float32 states (the mixture kernels) keep a shift that float32 would round: 1e9 + 0.25."""
    S, B, d = 3, 4, 600  # two d-tiles
    m, l, acc, a = _states(S, B, d, dtype, seed=11)
    if max_dtype is not None:
        m = m.to(max_dtype) - 1e9 - 0.25
    g = torch.Generator().manual_seed(12)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    ctr = torch.randn(d, generator=g, dtype=dtype)
    s2 = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=dtype) ** 2
    kw = dict(add_ctr=add_ctr, divide_by_s2=divide_by_s2, log_norm_scale=0.5 * d, stats=stats)
    ref = merge_mixture(m, l, acc, a, x, ctr, s2, kernel=False, **kw)
    got = merge_mixture(m, l, acc, a, x, ctr, s2, kernel=True, **kw)
    for r, k in zip(ref, got):
        if r is None:
            assert k is None
            continue
        finite = torch.isfinite(r)
        assert torch.equal(finite, torch.isfinite(k)) and not torch.isnan(k).any()
        assert rel_err(k[finite], r[finite]) < tol
    if stats and max_dtype is not None:
        assert got[2].dtype == max_dtype and torch.equal(got[2], ref[2])  # float32 would round the 0.25 away
    assert torch.equal(got[0][2], ctr if add_ctr else torch.zeros(d, dtype=dtype))
