"""examples/error_table.py: the sampler accuracy table on GMM data (docs/sampling.md)."""
import pytest

from helpers import import_example

error_table = import_example("error_table")

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# GMM data, exact score: the trend of the error table (docs/sampling.md) on a small case.
def test_error_table_trend_on_gmm_data():
    t = error_table.run(dim=8, n_components=3, n_samples=300, steps=(10, 35), skips=(0.0, 0.2, 0.4),
                        methods=("heun", "unipc"), ref_steps=300, tol=1e-4)
    assert t.reference_error < 1e-4
    for m in t.methods:
        for n in t.steps:
            full, light, heavy = (t.median_error[(m, n, f)] for f in t.skips)
            assert t.n_evals[(m, n, 0.2)] < t.n_evals[(m, n, 0.0)]
            assert light <= full * 1.05, (m, n, full, light)   # a light teleport costs no accuracy
            assert t.flips[(m, n, 0.2)] <= t.flips[(m, n, 0.0)] + 0.01
            k, auto_err, auto_flips, auto_evals = t.auto[(m, n)]   # choose_sigma_skip(tol=1e-4)
            assert k >= 0.2 * n and auto_evals < t.n_evals[(m, n, 0.0)]
            assert auto_err <= 1.1 * full and auto_flips <= t.flips[(m, n, 0.0)] + 0.01, (m, n, full, auto_err)
    # the Gaussian is wrong at low noise: teleporting 40% of an accurate run costs accuracy
    assert t.median_error[("unipc", 35, 0.4)] > 1.5 * t.median_error[("unipc", 35, 0.0)]
    assert "| heun | 10 |" in error_table.to_markdown(t)
