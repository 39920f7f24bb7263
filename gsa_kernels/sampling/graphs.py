"""CUDA graphs for the sampler loop: `sample(..., cuda_graph=True)` captures a whole run once and replays it.

For a given denoiser, schedule, method, options, teleport and noise shape/dtype/device, a sampler run is a
fixed sequence of tensor ops: every step coefficient and noise level is a host float computed from the
schedule before step 0, the step count is fixed, and no step reads device memory back to the host (see
samplers.py). So the whole run, teleport and denoiser calls included, is captured in one CUDA graph and
later calls replay it: one graph launch per `sample` call instead of a few hundred kernel launches and the
Python that issues them.

- Static buffers: the caller's noise is copied into the graph's input buffer; the result is read from the
  graph's output buffer (and cloned, since the next replay overwrites it). Temporaries live in the graph's
  private memory pool, so a replay allocates nothing.
- The capture runs the sampler a few times first (on a side stream, as CUDA graphs require) so that
  lazy initialisation and Triton compilation happen outside the capture. With churn or eta > 0 those runs
  advance the random generator; replays draw fresh noise from it (a custom CUDA generator is registered
  with the graph).
- Graphs are cached per denoiser (weakly: dropping the model drops its graphs) and key. A graph reads the
  model's parameter tensors by address: update them in place (load_state_dict, copy_) and the graph sees
  the new values; replacing the tensors (e.g. .to()) needs `clear_cache()`.
- A denoiser that synchronises (.item(), bool(tensor), data-dependent shapes) cannot be captured; CUDA
  raises an error at capture time. The package's models skip their GPU value checks during capture.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable

import torch

MAX_GRAPHS_PER_DENOISER = 8
_WARMUP_RUNS = 2
_cache: "weakref.WeakKeyDictionary[object, OrderedDict]" = weakref.WeakKeyDictionary()


class _CudaGraphCapture:
    """torch.cuda.CUDAGraph with the warm-up on a side stream that capture needs."""

    def __init__(self, device: torch.device, generator: torch.Generator | None):
        self.device = device
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None and generator.device.type == "cuda":
            register = getattr(self.graph, "register_generator_state", None)
            if register is None:
                raise ValueError("cuda_graph with a custom CUDA generator needs torch >= 2.6 "
                                 "(CUDAGraph.register_generator_state); pass generator=None to use the default one")
            register(generator)

    def warmup(self, fn: Callable[[], torch.Tensor], runs: int) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(runs):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


_Capture = _CudaGraphCapture  # the capture mechanism (tests on CPU swap in a direct-call stand-in)


def check_device(noise: torch.Tensor) -> None:
    if noise.device.type != "cuda":
        raise ValueError(f"cuda_graph needs CUDA tensors: noise is on {noise.device}")


class GraphedRun:
    """One captured sampler run: `run(noise) -> (x, n_evals)` captured with `noise` as its static input."""

    def __init__(self, run: Callable[[torch.Tensor], tuple], noise: torch.Tensor,
                 generator: torch.Generator | None = None, keep_alive: tuple = ()):
        self.static_noise = noise.detach().clone()
        self._capture = _Capture(noise.device, generator)
        evals = []

        def captured():
            x, n = run(self.static_noise)
            evals.append(n)
            return x

        with torch.no_grad():  # a replay has no autograd history
            self._capture.warmup(captured, _WARMUP_RUNS)
            self.static_out = self._capture.capture(captured)
        self.n_evals = evals[-1]
        self._keep_alive = keep_alive  # objects the graph reads by address (teleport model, generator)

    def __call__(self, noise: torch.Tensor) -> torch.Tensor:
        self.static_noise.copy_(noise)
        self._capture.replay()
        return self.static_out.clone()


def _owner_and_key(denoiser):
    """The object whose lifetime bounds the cache entry, and the method it stands for (bound methods are
    new objects on every attribute access, so they are keyed by their instance and function)."""
    owner = getattr(denoiser, "__self__", None)
    if owner is not None and hasattr(denoiser, "__func__"):
        return owner, denoiser.__func__
    return denoiser, None


def graphed_run(denoiser, noise: torch.Tensor, key: tuple, run: Callable[[torch.Tensor], tuple],
                generator=None, keep_alive: tuple = ()) -> tuple:
    """(x, n_evals) of `run(noise)` through a cached CUDA graph; captures it on the first call."""
    check_device(noise)
    owner, method = _owner_and_key(denoiser)
    full_key = (method, tuple(noise.shape), noise.dtype, noise.device, *key)
    try:
        graphs = _cache.setdefault(owner, OrderedDict())
    except TypeError:  # not weak-referenceable: capture for this call only
        graphs = OrderedDict()
    entry = graphs.get(full_key)
    if entry is None:
        entry = GraphedRun(run, noise, generator=generator, keep_alive=keep_alive)
        graphs[full_key] = entry
        while len(graphs) > MAX_GRAPHS_PER_DENOISER:
            graphs.popitem(last=False)
    else:
        graphs.move_to_end(full_key)
    return entry(noise), entry.n_evals


def clear_cache() -> None:
    """Drop every captured sampler graph (and the memory pools they hold)."""
    _cache.clear()
