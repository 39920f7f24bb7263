"""Errors of the raw ops as Python argument errors, translated in one place.

The C++ kernels validate their own inputs and raise RuntimeError with a message that names the argument
(the dispatcher does the same for a wrong argument type). The Python API re-raises such an error as the
exception a Python caller expects, with the same message: TypeError for a wrong type or dtype,
ValueError for everything else. Other RuntimeError subclasses (out of memory, ...) pass through.

A call that records no graph (grad mode off, or no argument requiring grad) goes straight to the
kernel below the Autograd key: the ops' autograd is registered from Python
(torch.library.register_autograd), and its kernel would otherwise run Python on every call only to
find there is nothing to record (several microseconds per call).
"""
from __future__ import annotations

import torch

_TYPE_MARKERS = ("dtype", "must be float32", "must be a floating", "Expected a value of type",
                 "must be a torch.Tensor")


def python_error(err: RuntimeError) -> Exception:
    """TypeError or ValueError with the message of a raw op's RuntimeError."""
    message = str(err)
    kind = TypeError if any(marker in message for marker in _TYPE_MARKERS) else ValueError
    return kind(message)


# The autograd kernel of torch.library ops decides the same way (torch/_library/autograd.py); a plain
# loop stands in where a PyTorch build lacks the C++ helper.
_any_requires_grad = getattr(torch._C, "_any_requires_grad", None) or (
    lambda *args: any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))
_below_autograd = torch._C._AutoDispatchBelowAutograd
_entry_points: dict = {}  # id(op) -> (op, its entry point); op is kept so that its id stays its own


def entry_point(op):
    """The C++ callable behind a raw op of one overload (what OpOverload.__call__ forwards to), resolved
    once: calling it skips two Python frames per call. The op itself where that is not available."""
    entry = _entry_points.get(id(op))
    if entry is None:
        overloads = op.overloads() if hasattr(op, "overloads") else ()
        target = getattr(op, overloads[0]) if len(overloads) == 1 else op
        entry = _entry_points[id(op)] = (op, getattr(target, "_op", target))
    return entry[1]


def call_op(op, *args):
    """op(*args) with its argument errors raised as TypeError / ValueError."""
    try:
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and _any_requires_grad(*args)):
            return op(*args)
        entry = _entry_points.get(id(op))  # entry_point(op), inlined: this runs on every call
        call = entry[1] if entry is not None else entry_point(op)
        with _below_autograd():
            return call(*args)
    except RuntimeError as err:
        if type(err) is not RuntimeError:
            raise
        raise python_error(err) from None
