"""sample(..., cuda_graph=True): the captured sampler run.

On CPU the capture mechanism is replaced by direct calls (warm-up runs, one "captured" run, replays that
rerun it into the static output), which checks everything a CUDA graph needs of the code around it: the
run is bit-identical to the plain loop, it reads the caller's noise only through the static input buffer,
it makes no host synchronisation and no host-to-device copy, and every denoiser call sees the same shapes.
On a GPU the real torch.cuda.CUDAGraph runs (test_cuda_graph_replay_on_gpu).
"""
import math

import pytest
import torch

import gsa_kernels as gk
from gsa_kernels import _validation as validation
from gsa_kernels.mixture import ops as mixture_ops
from gsa_kernels.sampling import graphs, karras_sigmas, sample
from helpers import requires_cuda
from helpers import HostSyncDetector

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("euler", {}), ("heun", {}), ("ddim", {}), ("dpmpp_2m", {}), ("unipc", {}), ("unipc", {"order": 3})]


def _model(d=12, r=4, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    eig = 0.1 + 3 * torch.rand(r, generator=g, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    return gk.GaussianModel(mean.to(dtype), basis.to(dtype), eig.to(dtype), 0.05).to(device)


def _network(model):
    """A stand-in network: the Gaussian denoiser plus a smooth nonlinearity (pure tensor ops)."""
    def denoise(x, sigma):
        return model.denoise(x, sigma) + 0.3 * torch.tanh(2 * x) / (1 + sigma.reshape(-1, 1))
    return denoise


class DirectCapture:
    """CPU stand-in for graphs._CudaGraphCapture: the captured function is called again on replay and its
    result written into the static output, as a graph replay would. The capture run is watched for host
    synchronisation and host-to-device copies."""
    captures = 0
    seen = []

    def __init__(self, device, generator):
        self.fn = None

    def warmup(self, fn, runs):
        assert runs >= 1
        for _ in range(runs):
            fn()

    def capture(self, fn):
        type(self).captures += 1
        # Under a real capture the package's value checks see torch.cuda.is_current_stream_capturing()
        # and skip their reads; CPU tensors would be read, so make them skip here too.
        with pytest.MonkeyPatch.context() as mp, HostSyncDetector() as det:
            mp.setattr(validation, "values_readable", lambda t, requested=True: False)
            mp.setattr(mixture_ops, "values_readable", lambda t, requested=True: False)
            self.out = fn()
        type(self).seen += det.seen
        self.fn = fn
        return self.out

    def replay(self):
        self.out.copy_(self.fn())


@pytest.fixture
def direct_capture(monkeypatch):
    monkeypatch.setattr(graphs, "_Capture", DirectCapture)
    monkeypatch.setattr(graphs, "check_device", lambda noise: None)
    monkeypatch.setattr(DirectCapture, "captures", 0)
    monkeypatch.setattr(DirectCapture, "seen", [])
    graphs.clear_cache()
    yield DirectCapture
    graphs.clear_cache()


@pytest.mark.parametrize("method,opts", CASES)
@pytest.mark.parametrize("skip", [0, 3])
def test_graphed_run_is_bit_identical_to_the_plain_loop(direct_capture, method, opts, skip):
    model = _model()
    net = _network(model)
    sig = karras_sigmas(8).tolist()
    for i in range(3):  # the first call captures, the next ones replay with new noise
        noise = torch.randn(5, 12, generator=torch.Generator().manual_seed(i))
        want = sample(net, noise, sig, method=method, gaussian=model, skip=skip, **opts)
        got = sample(net, noise, sig, method=method, gaussian=model, skip=skip, cuda_graph=True, **opts)
        assert torch.equal(got.x, want.x), (method, skip, i)
        assert got.n_evals == want.n_evals and got.sigma_start == want.sigma_start
    assert direct_capture.captures == 1
    assert direct_capture.seen == []


def test_one_graph_per_key_and_models_are_denoisers(direct_capture):
    model = _model()
    sig = karras_sigmas(6).tolist()
    noise = torch.randn(4, 12)
    a = sample(model, noise, sig, method="heun", cuda_graph=True)
    b = sample(model, noise, sig, method="heun", cuda_graph=True)  # model.denoise: a new bound method, same graph
    assert direct_capture.captures == 1 and torch.equal(a.x, b.x)
    sample(model, noise, sig, method="euler", cuda_graph=True)      # other method
    sample(model, noise[:2], sig, method="heun", cuda_graph=True)   # other shape
    sample(model, noise, karras_sigmas(5).tolist(), method="heun", cuda_graph=True)  # other schedule
    assert direct_capture.captures == 4
    assert torch.equal(a.x, sample(model, noise, sig, method="heun").x)


def test_static_output_is_not_handed_out(direct_capture):
    """The result is a copy: the next replay must not overwrite what the caller holds."""
    model = _model()
    sig = karras_sigmas(6).tolist()
    first = sample(model, torch.randn(4, 12), sig, method="euler", cuda_graph=True).x
    kept = first.clone()
    sample(model, torch.randn(4, 12), sig, method="euler", cuda_graph=True)
    assert torch.equal(first, kept)


@pytest.mark.parametrize("method,opts", [("euler", {"s_churn": 5.0}), ("heun", {"s_churn": 5.0}),
                                         ("ddim", {"eta": 0.5}), ("dpmpp_2m", {}), ("unipc", {"order": 3})])
def test_captured_run_has_static_shapes_and_no_host_traffic(direct_capture, method, opts):
    """Every denoiser call of the captured run sees tensors of one shape, dtype and device (a graph
    replays fixed shapes), and the run (teleport included) makes no device-to-host or host-to-device
    transfer (checked by DirectCapture.capture)."""
    model = _model()
    seen = []

    def net(x, sigma):
        seen.append((tuple(x.shape), x.dtype, tuple(sigma.shape), sigma.dtype))
        return _network(model)(x, sigma)

    gen = torch.Generator().manual_seed(0)
    res = sample(net, torch.randn(3, 12), karras_sigmas(8).tolist(), method=method, gaussian=model, skip=2,
                 generator=gen, cuda_graph=True, **opts)
    assert torch.isfinite(res.x).all()
    assert len(set(seen)) == 1 and len(seen) == (2 + 1 + 1) * res.n_evals  # 2 warm-ups, capture, replay
    assert direct_capture.seen == []


def test_cuda_graph_argument_errors():
    model = _model()
    sig = karras_sigmas(4).tolist()
    with pytest.raises(ValueError, match="cuda_graph needs CUDA tensors"):
        sample(model, torch.randn(2, 12), sig, cuda_graph=True)


def test_cuda_graph_rejects_callback(direct_capture):
    model = _model()
    with pytest.raises(ValueError, match="callback"):
        sample(model, torch.randn(2, 12), karras_sigmas(4).tolist(), cuda_graph=True, callback=lambda info: None)


def test_graphs_are_dropped_with_their_denoiser(direct_capture):
    import gc

    def make():
        model = _model()
        sample(model, torch.randn(2, 12), karras_sigmas(4).tolist(), method="euler", cuda_graph=True)
        return len(graphs._cache)

    assert make() == 1
    # DirectCapture keeps the captured closure (and so the model) alive through its replay function; a real
    # graph does not, so clear that reference the way a CUDA capture never holds it.
    for entries in list(graphs._cache.values()):
        for entry in entries.values():
            entry._capture.fn = None
    gc.collect()
    assert len(graphs._cache) == 0


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("method,opts", CASES + [("heun", {"s_churn": 5.0})])
def test_cuda_graph_replay_on_gpu(method, opts):
    """The real capture: replays match the plain loop (to rounding: kernels may differ under capture) and
    later calls replay without recapturing."""
    graphs.clear_cache()
    model = _model(d=64, r=8, device="cuda")
    net = _network(model)
    sig = karras_sigmas(10).tolist()
    stochastic = bool(opts.get("s_churn"))
    for i in range(3):
        noise = torch.randn(16, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
        got = sample(net, noise, sig, method=method, gaussian=model, skip=2, cuda_graph=True, **opts)
        assert torch.isfinite(got.x).all()
        if not stochastic:
            want = sample(net, noise, sig, method=method, gaussian=model, skip=2, **opts)
            err = float((got.x - want.x).norm() / want.x.norm())
            assert err < 1e-5, (method, i, err)
    owner_graphs = [g for entries in graphs._cache.values() for g in entries.values()]
    assert len(owner_graphs) == 1
    graphs.clear_cache()
    assert math.isfinite(float(got.x.norm()))
