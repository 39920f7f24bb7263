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


def _records_graph(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def call_op(op, *args):
    """op(*args) with its argument errors raised as TypeError / ValueError."""
    try:
        if _records_graph(args) or torch.compiler.is_compiling():
            return op(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    except RuntimeError as err:
        if type(err) is not RuntimeError:
            raise
        raise python_error(err) from None
