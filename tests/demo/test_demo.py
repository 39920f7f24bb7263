"""The demo's parts (data, model, metrics, equal-quality accounting) and a smoke run of the whole pipeline
in a tiny configuration."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from gsa_kernels.demo import data as demo_data
from gsa_kernels.demo import evaluate, metrics, pipeline
from gsa_kernels.demo.model import DenoiserConfig, EDMDenoiser
from gsa_kernels.demo.train import TrainConfig, load_or_train, train_denoiser


# ---- metrics -----------------------------------------------------------------------------------------
def test_frechet_distance_closed_forms():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    d = 6
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64)
    # Commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2.
    fd = metrics.frechet_distance_from_stats(mu1.numpy(), np.diag(a.numpy()), mu2.numpy(), np.diag(b.numpy()))
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert math.isclose(fd, expected, rel_tol=1e-10)
    # General covariances: the usual formula with a non-symmetric matrix square root.
    m1, m2 = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    c1, c2 = (m1 @ m1.T).numpy(), (m2 @ m2.T + 0.1 * torch.eye(d, dtype=torch.float64)).numpy()
    ref = float(((mu1 - mu2) ** 2).sum()) + np.trace(c1 + c2 - 2 * np.real(scipy_linalg.sqrtm(c1 @ c2)))
    assert math.isclose(metrics.frechet_distance_from_stats(mu1.numpy(), c1, mu2.numpy(), c2), ref, rel_tol=1e-8)
    # Sample sets: identical sets are at distance 0, a shifted set at ||shift||^2.
    x = torch.randn(500, d, generator=g)
    assert metrics.frechet_distance(x, x) < 1e-8
    assert math.isclose(metrics.frechet_distance(x, x + 0.5), d * 0.25, rel_tol=1e-5)
    with pytest.raises(ValueError, match="x"):
        metrics.frechet_distance(x[:1], x)


def test_quality_meter_uses_classifier_features():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 16, generator=g), torch.randint(0, 3, (200,), generator=g)
    clf = metrics.train_classifier(x, y, steps=5)
    meter = metrics.QualityMeter(x, clf)
    assert meter.metrics == ("fd_pixel", "fd_feature")
    same, far = meter(x), meter(x + 2.0)
    assert same["fd_pixel"] < 1e-6 and same["fd_feature"] < 1e-6
    assert far["fd_pixel"] > 60 and far["fd_feature"] > 0
    assert metrics.QualityMeter(x).metrics == ("fd_pixel",)


# ---- data ------------------------------------------------------------------------------------------
def test_digits_split():
    ds = demo_data.load_dataset(test_fraction=0.25, seed=0)
    assert ds.image_shape == (1, 8, 8) and ds.dim == 64 and ds.n_classes == 10
    assert ds.train.shape[0] + ds.test.shape[0] == 1797 and ds.test.shape[0] == 449
    assert float(ds.train.min()) == -1.0 and float(ds.train.max()) == 1.0
    again = demo_data.load_dataset(test_fraction=0.25, seed=0)
    assert torch.equal(ds.train, again.train) and ds.fingerprint() == again.fingerprint()
    assert demo_data.load_dataset(seed=1).fingerprint() != ds.fingerprint()


def test_data_from_files(tmp_path):
    g = np.random.default_rng(0)
    imgs = g.integers(0, 256, size=(30, 6, 5), dtype=np.uint8)
    np.save(tmp_path / "x.npy", imgs)
    ds = demo_data.load_dataset(str(tmp_path / "x.npy"), test_fraction=0.2)
    assert ds.image_shape == (1, 6, 5) and ds.train.shape == (24, 30) and ds.train_labels is None
    expected = torch.from_numpy(imgs.reshape(30, -1).astype(np.float32) / 127.5 - 1)
    assert torch.allclose(torch.cat([ds.train, ds.test]).sort(0).values, expected.sort(0).values)
    # A .pt dict with labels, channels last, floats in [0, 1].
    x = torch.rand(20, 4, 4, 3)
    torch.save({"images": x, "labels": torch.arange(20) % 2}, tmp_path / "x.pt")
    ds = demo_data.load_dataset(str(tmp_path / "x.pt"), test_fraction=0.25)
    assert ds.image_shape == (3, 4, 4) and ds.n_classes == 2 and float(ds.train.min()) >= -1
    # An image folder with one sub-folder per class.
    from PIL import Image

    for cls in ("a", "b"):
        os.makedirs(tmp_path / "imgs" / cls)
        for i in range(6):
            Image.fromarray(g.integers(0, 256, size=(5, 5), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    ds = demo_data.load_dataset(str(tmp_path / "imgs"), test_fraction=0.25)
    assert ds.image_shape == (1, 5, 5) and ds.n_classes == 2 and ds.train.shape[0] + ds.test.shape[0] == 12
    with pytest.raises(FileNotFoundError, match="--data"):
        demo_data.load_dataset(str(tmp_path / "missing.npy"))
    with pytest.raises(ValueError, match="test_fraction"):
        demo_data.load_dataset(test_fraction=1.0)
    np.save(tmp_path / "flat.npy", np.zeros((20, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="square"):
        demo_data.load_dataset(str(tmp_path / "flat.npy"))


# ---- model and training -------------------------------------------------------------------------------
def test_denoiser_preconditioning():
    cfg = DenoiserConfig(dim=16, hidden=32, blocks=2, embed=16, sigma_data=0.6)
    model = EDMDenoiser(cfg)
    x = torch.randn(5, 1, 4, 4)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0])
    # The output layer starts at zero, so D(x; sigma) = c_skip(sigma) x exactly.
    c_skip = 0.36 / (sigma**2 + 0.36)
    torch.testing.assert_close(model(x, sigma), c_skip[:, None, None, None] * x)
    torch.nn.init.normal_(model.out.weight)
    out = model(x, sigma)
    assert out.shape == x.shape
    torch.testing.assert_close(model(x[:1], 0.1), model(x[:1], torch.tensor([0.1])))
    with pytest.raises(ValueError, match="x"):
        model(torch.randn(2, 15), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        model(x, -1.0)


def test_checkpoint_is_reused(tmp_path):
    ds = demo_data.load_dataset()
    mcfg = DenoiserConfig(dim=64, hidden=16, blocks=1, embed=8, sigma_data=0.75)
    tcfg = TrainConfig(steps=3, batch_size=8)
    path = str(tmp_path / "ckpt.pt")
    m1, info1 = load_or_train(ds, mcfg, tcfg, path, progress=False, log=lambda *_: None)
    m2, info2 = load_or_train(ds, mcfg, tcfg, path, progress=False, log=lambda *_: None)
    assert not info1["cached"] and info2["cached"] and info1["steps_done"] == 3
    x = torch.randn(4, 64)
    torch.testing.assert_close(m1(x, 0.5), m2(x, 0.5))
    _m3, info3 = load_or_train(ds, mcfg, TrainConfig(steps=4, batch_size=8), path, progress=False,
                               log=lambda *_: None)
    assert not info3["cached"] and info3["steps_done"] == 4


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file if the checkpoint is ever unpickled


def test_cache_file_cannot_run_code(tmp_path):
    ds = demo_data.load_dataset()
    mcfg = DenoiserConfig(dim=64, hidden=16, blocks=1, embed=8, sigma_data=0.75)
    path, marker = tmp_path / "ckpt.pt", tmp_path / "executed"
    torch.save({"key": "x", "payload": _RunsCodeWhenUnpickled(str(marker))}, str(path))
    messages = []
    _model, info = load_or_train(ds, mcfg, TrainConfig(steps=2, batch_size=8), str(path), progress=False,
                                 log=messages.append)
    assert not marker.exists(), "loading the demo cache executed code from the file"
    assert not info["cached"] and any("not a loadable checkpoint" in m for m in messages)


def test_training_length_does_not_depend_on_the_clock():
    assert TrainConfig().max_minutes is None  # no wall-clock cap unless asked for
    ds = demo_data.load_dataset()
    mcfg = DenoiserConfig(dim=64, hidden=16, blocks=1, embed=8, sigma_data=0.75)
    _m, capped = train_denoiser(ds, mcfg, TrainConfig(steps=50, batch_size=8, max_minutes=1e-9), progress=False)
    assert capped["stopped_early"] and capped["steps_done"] < 50  # a cap, when asked for, is honoured and reported


# ---- equal-quality accounting ----------------------------------------------------------------------------
def _entry(n, k, nfe, fd, std=0.1):
    return {"method": "heun", "steps": n, "skip": k, "skip_fraction": k / n, "nfe": nfe,
            "fd_pixel_mean": fd, "fd_pixel_std": std}


def test_savings_accounting():
    assert evaluate.skips_for(10, (0.0, 0.15, 0.25, 0.5)) == [0, 2, 3, 5]
    summary = [
        _entry(10, 0, 19, 1.0), _entry(10, 2, 15, 1.05), _entry(10, 3, 13, 1.3), _entry(10, 5, 9, 1.05),
        _entry(6, 0, 11, 1.08), _entry(6, 2, 7, 2.0),
    ]
    by_n = {s.steps: s for s in evaluate.savings(summary, ["fd_pixel"])}
    s10 = by_n[10]
    # k=2 is within the spread (1.05 <= 1.0 + 0.1); k=3 is not, so k=5 does not count either.
    assert (s10.max_skip, s10.skip_nfe) == (2, 15)
    assert math.isclose(s10.saved_same_schedule, 1 - 15 / 19)
    # Against all configurations: N=6 plain (11 NFE) already reaches 1.08 <= 1.1; cheapest overall is (10, 5).
    assert (s10.cheapest_plain_steps, s10.cheapest_plain_nfe) == (6, 11)
    assert s10.cheapest_any == (10, 5) and math.isclose(s10.saved_vs_cheapest_plain, 1 - 9 / 11)
    assert by_n[6].max_skip == 0 and by_n[6].saved_same_schedule == 0.0


# ---- the whole pipeline, tiny ---------------------------------------------------------------------------
def test_demo_pipeline_smoke(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--train-steps", "30", "--hidden", "32",
            "--blocks", "1", "--batch-size", "64", "--classifier-steps", "30", "--methods", "heun,dpmpp_2m",
            "--steps", "3,5", "--skips", "0,0.4", "--seeds", "2", "--samples", "64", "--analysis-sigmas", "3",
            "--gmm-components", "3", "--gmm-rank", "4", "--grid-steps", "5", "--no-progress"]
    threads = torch.get_num_threads()
    results = pipeline.run(args)
    assert torch.get_num_threads() == threads  # the run's --threads setting does not leak out
    for name in pipeline.FIGURES.values():
        assert os.path.getsize(out / name) > 1000, name
    report = (out / "report.md").read_text()
    assert "Network evaluations saved at equal quality" in report and "![samples](samples_teleport.png)" in report
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == 2 * 2 * 2 * 2  # methods x steps x skips x seeds
    heun = [r for r in results["summary"] if r["method"] == "heun"]
    assert {(e["steps"], e["skip"], e["nfe"]) for e in heun} == {(3, 0, 5), (3, 1, 3), (5, 0, 9), (5, 2, 5)}
    assert all(math.isfinite(e["fd_feature_mean"]) and e["fd_pixel_mean"] >= 0 for e in results["summary"])
    assert set(results["analysis"]["ev_score"]) == {"Gaussian", "GMM (K=3)", "training set"}
    assert "summary" in capsys.readouterr().out
    # The report depends on the settings only: a second run from an empty cache writes the same file.
    shutil.rmtree(tmp_path / "cache")
    pipeline.run(args)
    assert (out / "report.md").read_text() == report
