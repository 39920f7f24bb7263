"""Values derived from tensors that do not change between calls (parameter casts, centres, log-weight
normalisers, value checks), computed once and reused while their source tensors are unchanged.

An entry is keyed on the identity of its source tensors and remembers each one's version counter
(`t._version`, bumped by every in-place write) and a weak reference to it: a source written in place,
freed, or replaced by a new tensor at the same address misses, so a cached value is never stale. The
cache holds no source alive; an entry is dropped when a source is freed, and the cache is bounded (least
recently used out). Tensors that do not track versions (inference tensors), sources that require grad
and calls under torch.compile are never cached.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

MAX_ENTRIES = 256


class _Entry:
    __slots__ = ("refs", "versions", "value")

    def __init__(self, refs, versions, value):
        self.refs, self.versions, self.value = refs, versions, value


class DerivedCache:
    def __init__(self, max_entries: int = MAX_ENTRIES):
        self._entries: OrderedDict = OrderedDict()
        self.max_entries = max_entries
        self.misses = 0

    @staticmethod
    def _versions(sources):
        try:
            return tuple(t._version for t in sources)
        except RuntimeError:  # inference tensors track no version: nothing can be proven unchanged
            return None

    def get(self, tag, sources: tuple, compute):
        """compute() for these source tensors, from the cache when they are unchanged since it ran."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            return compute()  # traced, or part of an autograd graph: a cached value would be wrong there
        versions = self._versions(sources)
        if versions is None:
            return compute()
        key = (tag,) + tuple(id(t) for t in sources)
        entry = self._entries.get(key)
        if (entry is not None and entry.versions == versions
                and all(ref() is t for ref, t in zip(entry.refs, sources))):
            self._entries.move_to_end(key)
            return entry.value
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


derived = DerivedCache()


def cached(tag, sources: tuple, compute):
    """The package-wide cache: compute() for these source tensors, reused while they are unchanged."""
    return derived.get(tag, sources, compute)


def as_contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t itself when it is already `dtype` and contiguous, else a cached contiguous copy in `dtype`."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return cached(("as_contiguous", dtype), (t,), lambda: t.to(dtype).contiguous())
