"""Training sets bigger than memory: the training-set mixture over points read from disk a chunk at a time.

`StreamedDeltaMixture` has DeltaMixture's API (denoise, score, log_prob, forward, partial) but keeps only
two chunks of rows in memory. Each call streams the chunks through the same fused op
(torch.ops.gsa.delta_mixture_forward) with one shared expansion centre (the mean of all points), and merges
the chunks' normalized partials exactly with the log-sum-exp merge of gsa_kernels._core.lse (docs/math.md
section 3): the result equals the in-memory DeltaMixture up to float rounding, with peak memory set by the
chunk size, not by N. While a chunk computes, a background thread reads the next one (disk reads and
copies release the GIL). On a GPU the reader fills pinned host buffers and copies them to the device on
a side stream (non_blocking), so disk, PCIe and compute overlap.

Point sources:
  * a `.npy` path: read with positioned reads (os.preadv) straight into the chunk buffer. Nothing is
    mapped, so the process's resident memory stays flat however large the file (the page cache is the
    kernel's, and it gives it back under pressure).
  * a numpy array or np.memmap (e.g. np.load(path, mmap_mode="r")): sliced per chunk. A memmap's pages
    count toward the process's RSS while mapped (reclaimable, file-backed).
  * a `.safetensors` path (if the safetensors package is installed): `key` names the tensor.
  * a CPU torch tensor (in memory; for comparisons).
Dtypes: float32, float64, float16, and bfloat16 stored as uint16 (numpy has no bfloat16): pass
dtype=torch.bfloat16 to reinterpret a uint16 array/file (write_npy does this for bfloat16 tensors).
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .._core.lse import merge_normalized
from .._validation import FLOAT_DTYPES, PARAM_DTYPES, check_tensor
from . import ops
from .model import Mixture

_CHUNK_BYTES = 1 << 26     # default chunk: 64 MiB of points
_NUMPY_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                   np.dtype(np.float16): torch.float16}


def _resolve_dtype(np_dtype: np.dtype, dtype, name: str) -> torch.dtype:
    if dtype is not None:
        if dtype == torch.bfloat16 and np_dtype in (np.dtype(np.uint16), np.dtype(np.int16)):
            return torch.bfloat16
        if _NUMPY_TO_TORCH.get(np_dtype) == dtype:
            return dtype
        raise TypeError(f"{name}: stored dtype {np_dtype} cannot be read as {dtype} "
                        f"(bfloat16 must be stored as uint16)")
    if np_dtype not in _NUMPY_TO_TORCH:
        raise TypeError(f"{name} must hold float16/float32/float64 (or uint16 with dtype=torch.bfloat16), "
                        f"got {np_dtype}")
    return _NUMPY_TO_TORCH[np_dtype]


class _NpyFile:
    """Rows of a C-ordered .npy file, read by positioned reads into a caller's buffer."""

    def __init__(self, path, dtype):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, np_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, np_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"points file {path}: .npy format version {version} is not supported")
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"points file {path} is Fortran-ordered; save it C-ordered")
        if len(shape) < 2:
            raise ValueError(f"points file {path} must hold an array [N, ...], got shape {shape}")
        self.n, self.d = shape[0], math.prod(shape[1:])
        self.dtype = _resolve_dtype(np_dtype, dtype, "points")
        self.row_bytes = self.d * np_dtype.itemsize
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._lock = threading.Lock()

    def read_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        pos, total, off = 0, (stop - start) * self.row_bytes, self.offset + start * self.row_bytes
        while pos < total:
            got = os.preadv(self._fd, [view[pos:total]], off + pos)
            if got <= 0:
                raise OSError(f"points file {self.path} ended early (truncated?)")
            pos += got

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class _ArrayRows:
    """Rows of an in-memory or memory-mapped array (numpy or torch, on the CPU)."""

    def __init__(self, arr, dtype):
        if isinstance(arr, torch.Tensor):
            check_tensor("points", arr, dtypes=FLOAT_DTYPES)
            if arr.device.type != "cpu":
                raise ValueError(f"points must be on the CPU (they are streamed to `device`), got {arr.device}")
            self.array, self.dtype = arr.reshape(arr.shape[0], -1), arr.dtype
        else:
            if arr.ndim < 2:
                raise ValueError(f"points must have shape [N, ...], got {arr.shape}")
            self.dtype = _resolve_dtype(arr.dtype, dtype, "points")
            self.array = arr.reshape(arr.shape[0], -1)
        self.n, self.d = self.array.shape

    def read_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        part = self.array[start:stop]
        if isinstance(part, np.ndarray):
            with warnings.catch_warnings():  # read-only memmaps: we only read
                warnings.simplefilter("ignore", UserWarning)
                part = torch.from_numpy(part)
            if self.dtype == torch.bfloat16:
                part = part.view(torch.bfloat16)
        out.copy_(part)


class _SafetensorsRows(_ArrayRows):
    def __init__(self, path, key, dtype):
        try:
            from safetensors import safe_open
        except ImportError as e:  # pragma: no cover
            raise ImportError("reading .safetensors points needs the safetensors package") from e
        self._file = safe_open(os.fspath(path), framework="pt")
        keys = list(self._file.keys())
        if key is None:
            if len(keys) != 1:
                raise ValueError(f"key must name the points tensor among {keys}")
            key = keys[0]
        self.array = self._file.get_slice(key)
        shape = self.array.get_shape()
        if len(shape) != 2:
            raise ValueError(f"points tensor {key!r} must have shape [N, d], got {shape}")
        self.n, self.d = shape
        stored = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}
        self.dtype = stored.get(self.array.get_dtype())
        if self.dtype is None or (dtype is not None and dtype != self.dtype):
            raise TypeError(f"points tensor {key!r} has dtype {self.array.get_dtype()}, expected a float dtype"
                            + (f" matching {dtype}" if dtype is not None else ""))


def open_points(points, dtype=None, key=None):
    """A row source for `points`: a .npy / .safetensors path, a numpy array or memmap, or a CPU tensor."""
    if isinstance(points, (str, os.PathLike)):
        path = os.fspath(points)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"points file not found: {path}")
        if path.endswith(".safetensors"):
            return _SafetensorsRows(path, key, dtype)
        return _NpyFile(path, dtype)
    if isinstance(points, (np.ndarray, torch.Tensor)):
        return _ArrayRows(points, dtype)
    raise TypeError(f"points must be a .npy/.safetensors path, a numpy array or a CPU tensor, "
                    f"got {type(points).__name__}")


def write_npy(path, batches, n: int, d: int, dtype=torch.float32) -> None:
    """Write n rows [*, d] from `batches` (tensors) to a .npy file, a batch at a time (bfloat16 as uint16)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    np_dtype = np.uint16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    out = np.lib.format.open_memmap(os.fspath(path), mode="w+", dtype=np_dtype, shape=(n, d))
    row = 0
    for b in batches:
        b = b.reshape(b.shape[0], -1).to(dtype)
        if b.shape[1] != d or row + b.shape[0] > n:
            raise ValueError(f"batches must be [*, d = {d}] and hold n = {n} rows in total")
        out[row:row + b.shape[0]] = (b.view(torch.uint16) if dtype == torch.bfloat16 else b).numpy()
        row += b.shape[0]
    if row != n:
        raise ValueError(f"batches held {row} rows, expected n = {n}")
    out.flush()
    del out


class StreamedDeltaMixture(Mixture):
    """The training-set mixture (DeltaMixture's API) over points streamed from disk in chunks.

    points: a .npy or .safetensors path, a numpy array / np.memmap, or a CPU tensor, [N, ...]. dtype:
    torch.bfloat16 to read uint16 storage as bfloat16. log_weights: [N] (tensor or numpy array, kept on
    the CPU) or None (uniform). chunk_rows: rows per chunk (default: 64 MiB of points). device: where the
    op runs (the chunks are copied there; on CUDA through pinned buffers). center: the expansion centre
    (default: the mean of all points, computed in one streaming pass that also checks the points are
    finite). prefetch: read the next chunk in a background thread while the current one computes.
    """

    def __init__(self, points, log_weights=None, *, dtype=None, key=None, chunk_rows: int | None = None,
                 device=None, center: torch.Tensor | None = None, prefetch: bool = True):
        super().__init__()
        self.source = open_points(points, dtype, key)
        n, d = self.source.n, self.source.d
        if n == 0 or d == 0:
            raise ValueError(f"points must hold at least one point and one dimension, got [{n}, {d}]")
        self.device = torch.device("cpu") if device is None else torch.device(device)
        itemsize = torch.empty(0, dtype=self.source.dtype).element_size()
        if chunk_rows is None:
            chunk_rows = max(1, _CHUNK_BYTES // (d * itemsize))
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        self.chunk_rows = min(chunk_rows, n)
        self.prefetch = bool(prefetch)
        if log_weights is not None:
            if isinstance(log_weights, np.ndarray):
                log_weights = torch.from_numpy(np.ascontiguousarray(log_weights))
            check_tensor("log_weights", log_weights, ndim=1, dtypes=PARAM_DTYPES)
            if log_weights.shape[0] != n:
                raise ValueError(f"log_weights must have shape [N] = [{n}], got {tuple(log_weights.shape)}")
            ops.check_log_weights(log_weights)
            log_weights = log_weights.cpu()
        self._log_weights = log_weights
        ct = torch.float64 if self.source.dtype == torch.float64 else torch.float32
        if center is None:
            center = self._mean_and_check()
        else:
            check_tensor("center", center, ndim=1, dtypes=FLOAT_DTYPES)
            if center.shape[0] != d:
                raise ValueError(f"center must have shape [d] = [{d}], got {tuple(center.shape)}")
        self.register_buffer("center", center.to(device=self.device, dtype=ct), persistent=False)

    # -- API shared with DeltaMixture -------------------------------------------------------------
    @property
    def n_points(self) -> int:
        return self.source.n

    @property
    def dim(self) -> int:
        return self.source.d

    def extra_repr(self) -> str:
        return (f"n_points={self.n_points}, dim={self.dim}, dtype={self.source.dtype}, "
                f"chunk_rows={self.chunk_rows}, device={self.device}")

    @property
    def log_weights(self) -> torch.Tensor | None:
        return self._log_weights

    def log_weight_norm(self):
        return ops.log_weight_norm(self._log_weights, self.n_points)

    def partial(self, x, sigma, *, score=False, return_weights=False, center=None):
        if return_weights:
            raise ValueError("return_weights: StreamedDeltaMixture does not return [B, N] posterior weights")
        s = self._sigma(x, sigma)
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the mixture streams to {self.device}")
        if math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"x must have shape [B, ...] with prod(...) = d = {self.dim}, got {tuple(x.shape)}")
        ctr = self.center if center is None else center
        out = log_z = None
        for start, pts in self._chunks():
            lw = None
            if self._log_weights is not None:
                lw = self._log_weights[start:start + pts.shape[0]].to(self.device, non_blocking=True)
            o, lz = torch.ops.gsa.delta_mixture_forward(x, pts, lw, s, ctr, score)
            # The running merge is kept in float64: B x d numbers, and the chunks' rounding does not add up.
            o = o.to(torch.float64)
            if out is None:
                out, log_z = o, lz
            else:
                out, log_z = merge_normalized(torch.stack([out, o]), torch.stack([log_z, lz]))
        return out.to(x.dtype), log_z, None

    # -- streaming --------------------------------------------------------------------------------
    def _mean_and_check(self) -> torch.Tensor:
        """Float64 mean of all points (the shared centre), checking finiteness chunk by chunk."""
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for start, pts in self._chunks():
            if not bool(torch.isfinite(pts).all()):
                raise ValueError(f"points has non-finite values (NaN or inf) in rows from {start}")
            total += pts.sum(0, dtype=torch.float64)   # no float64 copy of the chunk
        return total / self.n_points

    def _chunks(self):
        """Yield (start row, chunk [rows, d] on self.device), the next chunk read while this one is used."""
        n, rows = self.n_points, self.chunk_rows
        starts = list(range(0, n, rows))
        cuda = self.device.type == "cuda"
        host = [torch.empty((rows, self.dim), dtype=self.source.dtype, pin_memory=cuda)
                for _ in range(2 if self.prefetch else 1)]
        if cuda:
            dev = [torch.empty((rows, self.dim), dtype=self.source.dtype, device=self.device) for _ in host]
            copy_stream = torch.cuda.Stream(self.device)
            free = [torch.cuda.Event() for _ in host]
            for e in free:
                e.record()

        def load(i):
            slot = i % len(host)
            a = starts[i]
            b = min(a + rows, n)
            buf = host[slot][: b - a]
            self.source.read_into(a, b, buf)
            if not cuda:
                return buf
            with torch.cuda.stream(copy_stream):
                copy_stream.wait_event(free[slot])       # the op that read dev[slot] last is done
                out = dev[slot][: b - a]
                out.copy_(buf, non_blocking=True)
                done = torch.cuda.Event()
                done.record(copy_stream)
            done.synchronize()   # in this thread: host[slot] may be refilled, dev[slot] is ready
            return out

        if not self.prefetch:
            for i, a in enumerate(starts):
                yield a, load(i)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gsa-prefetch") as pool:
            pending = pool.submit(load, 0)
            try:
                for i, a in enumerate(starts):
                    chunk = pending.result()
                    if i + 1 < len(starts):
                        pending = pool.submit(load, i + 1)
                    yield a, chunk
                    if cuda:
                        free[i % len(host)].record()
            finally:
                pending.cancel()
