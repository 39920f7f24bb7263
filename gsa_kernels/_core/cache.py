"""Values derived from tensors that do not change between calls (parameter casts, centres, log-weight
normalisers, value checks), computed once and reused while their source tensors are unchanged.

An entry is keyed on the identity of its source tensors and remembers each one's version counter
(`t._version`, bumped by every in-place write) and a weak reference to it: a source written in place,
freed, or replaced by a new tensor at the same address misses, so a cached value is never stale. The
cache holds no source alive; an entry is dropped when a source is freed, and the cache is bounded (least
recently used out). Tensors that do not track versions (inference tensors), sources that require grad
and calls under torch.compile are never cached.

`Workspaces` keeps the scratch tensors of the Triton launchers between calls of one call signature (a
per-call allocation costs as much host time as a kernel launch), per thread and CUDA stream, so that two
calls can only share a scratch tensor when their kernels run in order.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

MAX_ENTRIES = 256


class _Entry:
    __slots__ = ("refs", "versions", "value")

    def __init__(self, refs, versions, value):
        self.refs, self.versions, self.value = refs, versions, value

    def holds(self, sources, grad: bool) -> bool:
        """Whether each weak reference still points at its source (not at a freed one's successor at the
        same address), the source is unwritten since the entry was made, and (with grad mode on) it
        does not require grad."""
        for ref, version, t in zip(self.refs, self.versions, sources):
            if ref() is not t or t._version != version or (grad and t.requires_grad):
                return False
        return True


class DerivedCache:
    def __init__(self, max_entries: int = MAX_ENTRIES):
        self._entries: OrderedDict = OrderedDict()
        self.max_entries = max_entries
        self.misses = 0

    @staticmethod
    def _versions(sources):
        try:
            return [t._version for t in sources]
        except RuntimeError:  # inference tensors track no version: nothing can be proven unchanged
            return None

    def get(self, tag, sources: tuple, compute):
        """compute() for these source tensors, from the cache when they are unchanged since it ran."""
        if torch.compiler.is_compiling():
            return compute()  # traced: a cached value would be a constant of the graph
        grad = torch.is_grad_enabled()
        key = (tag, *map(id, sources))
        entry = self._entries.get(key)
        if entry is not None and entry.holds(sources, grad):
            self._entries.move_to_end(key)
            return entry.value
        if grad and _any_requires_grad(sources):
            return compute()  # part of an autograd graph: a cached value would cut it
        versions = self._versions(sources)
        if versions is None:
            return compute()
        self.misses += 1
        value = compute()
        if self._versions(sources) != versions:  # compute() wrote a source: do not keep the result
            return value
        drop = self._drop_callback(key)
        self._entries[key] = _Entry(tuple(weakref.ref(t, drop) for t in sources), versions, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def _drop_callback(self, key):
        entries = weakref.ref(self._entries)

        def drop(_ref):
            live = entries()
            if live is not None:
                live.pop(key, None)

        return drop

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _any_requires_grad(sources) -> bool:
    for t in sources:
        if t.requires_grad:
            return True
    return False


derived = DerivedCache()


def cached(tag, sources: tuple, compute):
    """The package-wide cache: compute() for these source tensors, reused while they are unchanged."""
    return derived.get(tag, sources, compute)


def as_contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t itself when it is already `dtype` and contiguous, else a cached contiguous copy in `dtype`."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return cached(("as_contiguous", dtype), (t,), lambda: t.to(dtype).contiguous())


try:  # the current stream's handle without building a Stream object (what Triton's launcher reads too)
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - a build without CUDA
    def _raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream


class Workspaces:
    """Scratch tensors of a launcher (make() -> a tuple of tensors), kept for the next call with the same
    key (the call signature: shapes, dtypes, device) on the same thread and CUDA stream.

    Sound because each call's kernels write a scratch tensor before they read it (or the launcher zeroes
    it) and never return it: two calls that share one run in order on one stream (a later call's writes
    queue behind an earlier call's reads), and calls from other threads or streams get their own. During
    CUDA-graph capture each call allocates (the graph keeps its own). Scratch sets above max_bytes are not
    kept (at that size the kernel time dwarfs an allocation); at most max_entries per thread, least
    recently used out."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 16 << 20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._local = threading.local()

    def get(self, key, like: torch.Tensor, make):
        """make() or the scratch tensors it made for `key` on an earlier call, for kernels that run on the
        device (and current stream) of `like`."""
        stream = None  # off CUDA each launch runs to completion (the interpreter)
        if like.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return make()
            stream = _raw_stream(like.get_device())
        entries = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = OrderedDict()
        key = (key, stream)
        tensors = entries.get(key)
        if tensors is not None:
            entries.move_to_end(key)
            return tensors
        tensors = make()
        if sum(t.numel() * t.element_size() for t in tensors) <= self.max_bytes:
            entries[key] = tensors
            while len(entries) > self.max_entries:
                entries.popitem(last=False)
        return tensors

    def held(self) -> list:
        """This thread's kept scratch tensors, most recently used last."""
        return [t for tensors in getattr(self._local, "entries", {}).values() for t in tensors]

    def clear(self) -> None:
        """Drop this thread's scratch tensors."""
        self._local.entries = OrderedDict()


workspaces = Workspaces()
